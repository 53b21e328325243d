"""The study: TPE proposes learning rate, batch size and weight decay; ASHA prunes; each trial is
one `train(cfg)`; the report is written from the storage at the end.

Resumable and shareable. The study lives in its storage (lit_sft/storage.py: a SQLite file by
default, PostgreSQL across machines). Any number of `tune.py` processes given the same storage
and study name work on it together, and running the same command again continues it:

- `n_trials` is the study's total. Under the study lock a worker recovers trials whose worker
  died (FAIL, queued again with the same parameters), counts the study's trials, and creates the
  next one only if the count is short; so several workers stop at exactly `n_trials`.
- The sampler is reseeded from the trial number before each trial: numbers are unique across
  workers and restarts, so no two workers propose the same point and a restart proposes new ones.
- Everything a trial writes is keyed by study and trial number; the best model is swapped in
  under a lock; the report is rebuilt from the storage by whichever worker finishes.
- A trial may use several processes (`--trainer.devices 2 --trainer.strategy ddp`): the tuner
  starts ranks 1..N-1 itself, as plain training processes that never touch the study.

Modules, one job each: `config` (the `study:` section), `build` (sampler, pruner, storage ->
the study), `objective` (one trial), `ranks` (several processes per trial), `progress` (the
console lines), `disk` (what finished trials leave behind), `report` and `plots` (what a study
leaves for people), `run` (the loop: `tune(cfg)`).
"""
