"""Reproducers: bundles (a violation with its config, trace and timeline), re-running
them (repro), controlled schedules that replay them exactly (hunt, replay) and the
smallest one that still fails (shrink)."""
