"""The study: TPE proposes learning rate, batch size and weight decay; ASHA prunes; each trial is
one `train(cfg)`; the report is written from the storage at the end.

Resumable and shareable. The study lives in its storage (lit_sft/storage.py: a SQLite file by
default, PostgreSQL across machines). Any number of `tune.py` processes given the same storage
and study name work on it together, and running the same command again continues it:

- `budget.total_examples` (and the optional cap `n_trials`) is the study's total. Under the study
  lock a worker recovers trials whose worker died (FAIL, queued again with the same parameters),
  counts the examples trained and the trials, and creates the next trial only if both are short;
  so several workers stop together, each finishing the trial it runs (lit_sft/study/budget.py).
- The sampler is reseeded from the trial number before each trial: numbers are unique across
  workers and restarts, so no two workers propose the same point and a restart proposes new ones.
- Everything a trial writes is keyed by study and trial number; the best model is swapped in
  under a lock; the report is rebuilt from the storage by whichever worker finishes.
- A trial may use several processes (`--trainer.devices 2 --trainer.strategy ddp`): the tuner
  starts ranks 1..N-1 itself, as plain training processes that never touch the study.

Modules, one job each: `config` (the `study:` section), `build` (sampler, pruner, storage ->
the study), `objective` (one trial), `ranks` (several processes per trial), `progress` (the
console lines), `disk` (what finished trials leave behind), `budget` (examples spent, rungs, the
baseline trial), `results` (the summary as data and the formatting every writer shares),
`report`, `markdown` and `plots` (what a study leaves for people; they import `results`, never
each other backwards), `run` (the loop: `tune(cfg)`).
"""
