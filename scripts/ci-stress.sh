#!/usr/bin/env bash
# A ready CI stress job: a time-boxed soak of the fixed protocol, then proof
# that each bug variant is still caught.  JUnit files land in OUT, the soak's
# results, checkpoint and reproducer bundles in OUT/soak/latest/ (a link to the
# soak's own timestamped directory); keep OUT as the job's artifacts.
#
#   scripts/ci-stress.sh [DURATION] [OUT]      e.g. scripts/ci-stress.sh 10m ci-stress
#
# Exit: 0 all good; otherwise the first failing step's tdp-stress exit code
# (1 violation / bug not caught, 3 crash, 4 hang, 130 interrupted).
set -u
duration=${1:-5m}
out=${2:-ci-stress-out}
mkdir -p "$out"
tdp-stress cleanup >/dev/null        # segments left by earlier, killed jobs
rc=0

# 1. the fixed protocol, time-boxed: tdp-stress ends within duration + 5 s by
#    itself; `timeout` is only the belt to its braces
secs=$(python3 -c "from stress.config import parse_duration as p; print(int(p('$duration')))")
timeout --signal=INT --kill-after=30 $((secs + 60)) \
    tdp-stress soak configs/default.toml --duration "$duration" --epoch 2m --keep-going \
    --plain --out "$out/soak" --junit "$out/junit-soak.xml"
step=$?
[ $step -ne 0 ] && [ $rc -eq 0 ] && rc=$step

# 2. every bug variant must still be caught (one seed each, on its own config)
timeout --signal=INT --kill-after=30 1800 \
    tdp-stress zoo --seeds 1 --cap 60s --fixed 0 --json "$out/zoo.json" \
    --junit "$out/junit-zoo.xml"
step=$?
[ $step -ne 0 ] && [ $rc -eq 0 ] && rc=$step
exit $rc
