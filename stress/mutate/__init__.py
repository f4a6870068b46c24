"""``tdp-stress mutate``: the tester's self-test by mutation.

Generic mutants of the protocol code (``stress/model/``: tdp_mmu.py, tdp_iter.py,
roots.py, mirror.py, notifier.py) are each run as a real stress run on a shipped config
that executes the mutated statement, for a bounded time, and end as one outcome:
killed by a named oracle, killed by a crash or hang, survived, equivalent (argued in
``equivalent.toml``), stillborn (does not compile or import) or unreached (no config that
runs clean executes that statement).  The score is killed-by-named-oracle / (all -
equivalent - stillborn), per file and in total: a benchmark of the oracles, not a test.

Modules:

* :mod:`.operators`: the operators (``ast`` finds the sites, a byte splice applies
  them, so a mutant is a one-hunk diff with the original line numbers) and stable ids;
* :mod:`.reach`: the reachability pass (probes before every site, each config run once
  unmutated, cached in OUT/reach.json) and the choice of a config per mutant;
* :mod:`.sandbox`: a copy of the package per run, the run in its own session, the kill
  and the /dev/shm cleanup;
* :mod:`.runner`: classification, sampling, the score and its report;
* :mod:`.command`: the click command that ``stress/cli.py`` registers.

Why not mutmut or cosmic-ray (checked on mutmut 3.8.1 and cosmic-ray 8.7.0, the
versions the package index serves):

* Their operators are generic over Python, not over this protocol.  mutmut's
  (``mutation/mutators.py``: numbers, strings, names, assignments, unary and binary
  operators, call arguments, string methods, lambdas, keywords, match, if-expressions)
  sit in a module-level list with no plugin interface, and none drops or reorders a
  statement, so none can drop an unlock, a flush or an RCU boundary, swap two shared
  accesses or split a cmpxchg.  cosmic-ray's core set (operator, boolean, number and
  keyword replacement, break/continue, exceptions, decorators, zero-iteration loops)
  is the same kind; it does take operator plugins (a ``cosmic_ray.operator_providers``
  entry point), so the operators would have been ours anyway.
* Their outcomes are pass/fail of one test command.  mutmut runs pytest (in a
  fork) and counts a failing test run as a kill; cosmic-ray runs one ``test-command``
  for the whole session and counts a non-zero exit or a timeout as a kill.  Neither
  can tell a named violation from a crash or a hang, and neither picks a config per
  mutant: both would need a wrapper that finds out which function was mutated and
  reads results.json, which is most of this package.
* Their way of getting the mutant into the code under test does not fit.  mutmut
  turns each function into a trampoline that picks the active mutant on *every call*
  from ``MUTANT_UNDER_TEST``: an extra dispatch on the model's hot path (a fault
  already takes tens of microseconds of Python), in the processes whose speed makes the
  races.  cosmic-ray writes the mutant into the module file in place and restores it
  afterwards (``mutating.use_mutation``): in a work tree other engineers use, with an
  editable install, that is unsafe, and it rules out parallel mutants.  Here each run
  gets a copy of the package with its one mutated file and runs in its own session.
"""
