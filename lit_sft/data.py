"""SFTDataModule: records -> prompt/response -> token ids with the prompt masked -> batches."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, RandomSampler
from typing_extensions import override

from lit_sft import sources
from lit_sft.errors import UserError
from lit_sft.formats import FIELDS, Example, Problem, examples_from, problems_from, r1_zero_prompt
from lit_sft.packing import pack_collate, pad_collate

log = logging.getLogger(__name__)
IGNORE = -100
_SPLIT_KEYS = ("train_path", "train_split", "schema", "columns", "validation_path", "validation_split", "num_validation_problems",
               "max_length", "truncation", "eval_size", "eval_max_fraction", "num_generated", "filter_correct", "seed")
_ROLES = {
    "train": ("train_path", "train_split", "schema", "columns", ("train",)),
    "validation": ("validation_path", "validation_split", "validation_schema", "validation_columns", ("validation", "test")),
    "test": ("test_path", "test_split", "test_schema", "test_columns", ("test",)),
}
"""role -> its keys (source, split, schema, column map) and the splits tried when none is named."""
_SPLITS: dict[tuple, tuple] = {}
"""The last tokenized (train, eval, stats) split of this process, keyed by what decides it."""


@dataclass
class TokenStats:
    """What tokenization did to the records; truncation is counted, never silent."""

    examples: int = 0
    truncated: int = 0
    """Responses cut at `max_length` (policy "truncate")."""
    dropped: int = 0
    """Records dropped for being longer than `max_length` (policy "drop")."""
    filtered_wrong: int = 0
    """Traces dropped by `filter_correct` because their answer does not match the ground truth."""
    lengths: list[int] = field(default_factory=list, repr=False)


class SFTDataModule(LightningDataModule):
    """Reads SFT records, holds out a fixed eval split, and batches one optimizer step at a time."""

    # mutmut's trampoline would hide these arguments from save_hyperparameters' frame inspection.
    def __init__(
        self,
        train_path: str | None = None,
        validation_path: str | None = None,
        schema: str | None = None,
        validation_schema: str | None = None,
        test_path: str | None = None,
        test_schema: str | None = None,
        train_split: str | None = None,
        validation_split: str | None = None,
        test_split: str | None = None,
        columns: dict[str, str] | None = None,
        validation_columns: dict[str, str] | None = None,
        test_columns: dict[str, str] | None = None,
        tokenizer_name_or_path: str | None = None,
        batch_size: int = 32,
        micro_batch_size: int | None = None,
        max_length: int = 2048,
        truncation: Literal["truncate", "drop", "error"] = "truncate",
        eval_size: int = 500,
        eval_max_fraction: float = 0.2,
        num_validation_problems: int = 500,
        num_test_problems: int = 500,
        num_generated: int = 20000,
        packing: bool = False,
        filter_correct: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:  # pragma: no mutate block
        """
        Args:
            train_path: SFT records (prompt/response, question/answer, problem/solution): a .jsonl,
                .parquet, .json or .csv file, a `save_to_disk` folder, a folder laid out as a Hub
                dataset, or a Hub dataset id (owner/name); None = generated problems (the embedded task).
            validation_path: Problems with answers, for accuracy (any source train_path takes);
                None = generated. The training source itself is allowed: its validation problems
                are then held out of training.
            schema: Force the record schema of `train_path` instead of detecting it from field names.
            validation_schema: Same for `validation_path`.
            test_path: Problems with answers (any source train_path takes) that no trial and no selection step sees:
                the study's best model is graded on them once, at the end. None = the generated
                test split when training on generated data, else no final test. The validation
                source itself is allowed: its problems after the validation sample are used.
            test_schema: Same for `test_path`.
            train_split: The split of `train_path` to train on; None = "train", or a source's only split.
            validation_split: Same for `validation_path`; None = "validation", else "test", or the only split.
            test_split: Same for `test_path`; None = "test", or the only split.
            columns: Schema field -> column of `train_path`, for a dataset that names them otherwise
                (e.g. {question: q, answer: a}).
            validation_columns: Same for `validation_path`.
            test_columns: Same for `test_path`.
            tokenizer_name_or_path: Tokenizer; None = the model's (train.py fills it in).
            batch_size: Examples per optimizer step, over all devices.
            micro_batch_size: Examples per forward pass; gradients accumulate over the rest. None = batch_size.
            max_length: Longest tokenized prompt+response.
            truncation: What to do with a record longer than `max_length`: cut its response
                ("truncate"), skip it ("drop"), or stop ("error"). Each is counted and reported.
            eval_size: Held-out records for `eval/loss` (fixed seed, identical across runs).
            eval_max_fraction: Cap on the held-out share of the records.
            num_validation_problems: Problems with answers kept for the evaluator's accuracy.
            num_test_problems: Problems of the final test.
            num_generated: Training records to generate when `train_path` is None.
            packing: Concatenate each micro-batch into one padding-free row (position ids restart
                per example) instead of padding.
            filter_correct: Keep only traces whose answer grades correct against the ground truth.
            seed: Seed of the eval split, validation sample and shuffling.
            num_workers: DataLoader workers.
        """
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = None
        self.stats = TokenStats()
        self.train_set: list[dict[str, Any]] = []
        self.eval_set: list[dict[str, Any]] = []
        self._problems: list[Problem] | None = None
        self._validate()

    def _validate(self) -> None:
        hp, problems = self.hparams, []
        if hp.batch_size < 1:
            problems.append(f"data.batch_size must be >= 1, got {hp.batch_size}")
        if hp.micro_batch_size is not None and hp.micro_batch_size < 1:
            problems.append(f"data.micro_batch_size must be >= 1, got {hp.micro_batch_size}")
        if hp.max_length < 8:
            problems.append(f"data.max_length must be >= 8, got {hp.max_length}")
        if not 0 < hp.eval_max_fraction < 1:
            problems.append(f"data.eval_max_fraction must be in (0, 1), got {hp.eval_max_fraction}")
        if hp.eval_size < 1:
            problems.append(f"data.eval_size must be >= 1, got {hp.eval_size}")
        problems.extend(column_map_problems(hp))
        if problems:
            raise UserError("; ".join(problems))

    # ---- records -----------------------------------------------------------------------------

    def _source(self, role: str) -> sources.Source:
        path, split, _, _, defaults = _ROLES[role]
        return sources.Source(self.hparams[path], self.hparams[split], defaults, f"data.{path}", f"data.{split}")

    def _read(self, role: str, records: sources.Rows | None = None, picked: list[int] | None = None, *, problems: bool) -> list:
        """The role's records as examples or problems (`picked`: those indices only, in that order)."""
        rows = records or sources.read(self._source(role))
        _, _, schema, columns, _ = _ROLES[role]
        chosen = rows.records if picked is None else [rows.records[i] for i in picked]
        convert = problems_from if problems else examples_from
        return convert(chosen, rows.label, self.hparams[schema], columns=self.hparams[columns], table=rows.columns,
                       columns_key=f"data.{columns}")

    def _sample(self, n: int) -> list[int]:
        """The seeded order in which problems are sampled from a source of `n` records."""
        order = list(range(n))
        random.Random(self.hparams.seed).shuffle(order)
        return order

    def _validation_is_training_data(self) -> bool:
        hp = self.hparams
        return bool(hp.train_path and hp.validation_path and sources.same_data(self._source("train"), self._source("validation")))

    def _examples(self) -> list[Example]:
        hp = self.hparams
        if hp.train_path:
            rows = sources.read(self._source("train"))
            if not self._validation_is_training_data():
                return self._read("train", rows, problems=False)
            held = set(self._sample(len(rows.records))[: hp.num_validation_problems])
            if len(held) >= len(rows.records):
                raise UserError(f"data.validation_path: {rows.label} is also the training data and has {len(rows.records)} records; "
                                f"holding out data.num_validation_problems={hp.num_validation_problems} leaves none to train on")
            return self._read("train", rows, [i for i in range(len(rows.records)) if i not in held], problems=False)
        from lit_sft.synthetic import make_sft_records

        return [Example(r["prompt"], r["response"], r["ground_truth"]) for r in make_sft_records(hp.num_generated, hp.seed)]

    @property
    def validation_problems(self) -> list[Problem]:
        """The fixed problems (with answers) the evaluator grades; same sample every run."""
        if self._problems is None:
            hp = self.hparams
            if hp.validation_path:
                # The training data's held-out records when validation reads it (see _examples).
                rows = sources.read(self._source("validation"))
                problems = self._read("validation", rows, self._sample(len(rows.records)), problems=True)
            else:
                from lit_sft.synthetic import make_problems

                problems = [Problem(r1_zero_prompt(r["problem"]), r["answer"]) for r in make_problems(hp.num_validation_problems, hp.seed + 1)]
            self._problems = problems[: hp.num_validation_problems]
        return self._problems

    @property
    def test_problems(self) -> list[Problem] | None:
        """The final test's problems, disjoint from the validation sample; None if there is no test set."""
        hp = self.hparams
        if hp.test_path:
            test = self._source("test")
            if hp.train_path and sources.same_data(test, self._source("train")):
                raise UserError(f"data.test_path: {sources.read(test).label} is the training data; the final test needs "
                                "problems no run trained on (a held-out split, or another dataset)")
            if hp.validation_path and sources.same_data(test, self._source("validation")):
                rows = sources.read(self._source("validation"))
                # The validation sample's order, so the rest is unseen.
                rest = self._read("validation", rows, self._sample(len(rows.records)), problems=True)[hp.num_validation_problems :]
                if not rest:
                    raise UserError(f"data.test_path: {rows.label} is the validation data and has no problems beyond the "
                                    f"{hp.num_validation_problems} validation ones; lower data.num_validation_problems")
                return rest[: hp.num_test_problems]
            rows = sources.read(test)
            return self._read("test", rows, self._sample(len(rows.records)), problems=True)[: hp.num_test_problems]
        if hp.train_path:
            return None
        from lit_sft.synthetic import exercises, make_problems

        # Capped at the split's distinct questions: a repeated problem would count twice in the interval.
        n = min(hp.num_test_problems, len(exercises("test")))
        return [Problem(r1_zero_prompt(r["problem"]), r["answer"]) for r in make_problems(n, hp.seed + 2, split="test")]

    def _filter_correct(self, examples: list[Example]) -> list[Example]:
        from lit_sft.grading import Category, grade

        kept = [e for e in examples if e.answer is None or grade(e.response, e.answer).category == Category.CORRECT]
        self.stats.filtered_wrong = len(examples) - len(kept)
        return kept

    # ---- tokens ------------------------------------------------------------------------------

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        from lit_sft.weights import resolve_model_path

        path = resolve_model_path(self.hparams.tokenizer_name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as err:
            raise UserError(f"data.tokenizer_name_or_path: cannot load tokenizer {path!r}: {str(err).splitlines()[0]}") from err
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _tokenize(self, examples: list[Example], stats: TokenStats) -> list[dict[str, Any]]:
        """Token ids with the prompt masked; what truncation did is counted into `stats`."""
        hp, tok = self.hparams, self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        prompts = tok([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
        responses = tok([e.response for e in examples], add_special_tokens=False)["input_ids"]
        out = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            if len(prompt) >= hp.max_length:
                raise UserError(
                    f"{_where(examples[i], i, hp.train_path)}: prompt is {len(prompt)} tokens, "
                    f"which leaves no room for a response within data.max_length={hp.max_length}"
                )
            response = response + eos
            overflow = len(prompt) + len(response) - hp.max_length
            if overflow > 0:
                if hp.truncation == "error":
                    raise UserError(
                        f"{_where(examples[i], i, hp.train_path)}: {len(prompt) + len(response)} tokens > data.max_length="
                        f"{hp.max_length} (set data.truncation to 'truncate' or 'drop')"
                    )
                if hp.truncation == "drop":
                    stats.dropped += 1
                    continue
                stats.truncated += 1
                response = response[: len(response) - overflow]
            ids = prompt + response
            stats.lengths.append(len(ids))
            out.append({"input_ids": ids, "labels": [IGNORE] * len(prompt) + response})
        stats.examples = len(out)
        return out

    # ---- Lightning hooks ---------------------------------------------------------------------

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set:
            return
        hp = self.hparams
        self.tokenizer = self._load_tokenizer()
        stamp = sources.stamp(hp.train_path) if hp.train_path else None
        key = tuple(repr(hp.get(k)) for k in _SPLIT_KEYS) + (self.tokenizer.name_or_path, stamp)
        if key not in _SPLITS:  # trials of a study share the tokenized split: build it once
            _SPLITS.clear()
            _SPLITS[key] = self._build_split()
        self.train_set, self.eval_set, self.stats = _SPLITS[key]
        if self.per_device_batch_size > len(self.train_set):
            raise UserError(batch_problem(hp.batch_size, self.per_device_batch_size, self.split_note(len(self.train_set))))

    def split_note(self, n_train: int) -> str:
        """`the 8 training records (10 in FILE, 2 held out for eval/loss)`: where a count comes from."""
        hp = self.hparams
        if not hp.train_path:
            return f"the {n_train} training records"
        held = self.held_out(self.n_usable)
        return (f"the {n_train} training records ({self.n_usable} usable in {hp.train_path}, {held} held out for eval/loss: "
                f"data.eval_size={hp.eval_size}, at most data.eval_max_fraction={hp.eval_max_fraction:g} of them)")

    def held_out(self, n_records: int) -> int:
        """Records of the training source held out for eval/loss (generated data has its own split)."""
        hp = self.hparams
        return min(hp.eval_size, int(n_records * hp.eval_max_fraction)) if hp.train_path else 0

    @property
    def n_usable(self) -> int:
        return len(self.train_set) + len(self.eval_set) if self.train_set else 0

    def _build_split(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], TokenStats]:
        hp = self.hparams
        examples = self._examples()
        if hp.filter_correct:
            examples = self._filter_correct(examples)
        records = self._tokenize(examples, self.stats)
        if self.stats.truncated or self.stats.dropped:
            log.warning(
                "data: %d of %d records longer than data.max_length=%d were %s",
                self.stats.truncated + self.stats.dropped, len(examples), hp.max_length,
                "truncated" if hp.truncation == "truncate" else "dropped",
            )
        if not hp.train_path:
            # Generated data has a validation split of its own: eval/loss on unseen questions.
            from lit_sft.synthetic import make_sft_records

            held_out = [Example(r["prompt"], r["response"], r["ground_truth"]) for r in make_sft_records(hp.eval_size, hp.seed, split="validation")]
            return records, self._tokenize(held_out, TokenStats()), self.stats
        order = list(range(len(records)))
        random.Random(hp.seed).shuffle(order)
        n_eval = self.held_out(len(records))
        if n_eval < 1 or len(records) - n_eval < 1:
            raise UserError(f"{hp.train_path}: only {len(records)} usable records, too few to train and hold out an eval set")
        return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]], self.stats

    @property
    def world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    @property
    def per_device_batch_size(self) -> int:
        hp = self.hparams
        if hp.batch_size % self.world_size:
            raise UserError(f"data.batch_size={hp.batch_size} is not divisible by the {self.world_size} devices")
        return hp.batch_size // self.world_size

    @property
    def micro_batch_size(self) -> int:
        return min(self.hparams.micro_batch_size or self.per_device_batch_size, self.per_device_batch_size)

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self.hparams.packing:
            return pack_collate(rows)
        return pad_collate(rows, pad_id=self.tokenizer.pad_token_id)

    def collate_step(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One optimizer step's examples -> micro-batches of similar lengths (less padding)."""
        rows = sorted(rows, key=lambda r: len(r["input_ids"]))
        size = self.micro_batch_size
        return [self._collate(rows[i : i + size]) for i in range(0, len(rows), size)]

    @override
    def train_dataloader(self) -> DataLoader:
        import torch

        generator = torch.Generator().manual_seed(self.hparams.seed)
        # batch_size + sampler, not a BatchSampler: under DDP Lightning swaps the sampler for a
        # DistributedSampler and keeps batch_size; a plain BatchSampler it drops (batch size 1).
        return DataLoader(
            self.train_set, batch_size=self.per_device_batch_size, sampler=RandomSampler(self.train_set, generator=generator),
            drop_last=True, collate_fn=self.collate_step,
            num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0,
        )

    @override
    def val_dataloader(self) -> DataLoader:
        # Sorted by length so eval micro-batches pad little; the set is fixed, so order is too.
        rows = sorted(self.eval_set, key=lambda r: len(r["input_ids"]))
        return DataLoader(rows, batch_size=self.micro_batch_size, shuffle=False, collate_fn=self._collate)


def _where(example: Example, index: int, source: str | None) -> str:
    return example.where or f"record {index + 1} of {source or 'the generated data'}"


def column_map_problems(data: Any) -> list[str]:
    """A column map (data.columns, ...) must map schema fields to column names."""
    problems = []
    for role in _ROLES.values():
        key, columns = role[3], data.get(role[3])
        if columns is None:
            continue
        if not isinstance(columns, dict):
            problems.append(f"data.{key} must map schema fields to column names ({{question: q, answer: a}}), got {columns!r}")
            continue
        unknown = sorted(str(f) for f in columns if f not in FIELDS)
        if unknown:
            problems.append(f"data.{key}: unknown field(s) {', '.join(unknown)}; the schemas' fields are {', '.join(FIELDS)}")
        if any(not isinstance(c, str) or not c for c in columns.values()):
            problems.append(f"data.{key}: every column name must be a non-empty string, got {columns!r}")
    return problems


def data_problems(cfg: dict[str, Any]) -> list[str]:
    """The first problem of each configured data source, read as the run will read it (no tokenizer,
    no model): `config.check` reports them beside the config's own. The validation problems are read
    where an evaluator grades them, the test problems where a study (`cfg["study"]`) tests on them."""
    data = cfg["data"]
    if not any(data.get(k) for k in ("train_path", "validation_path", "test_path")):
        return []  # generated data cannot be malformed
    try:
        module = SFTDataModule(**data)
    except UserError:
        return []  # values out of range, which the config's range rules name
    evaluator = (cfg.get("evaluator") or {}).get("enabled", True)
    reads = [("train_path", module._examples), ("validation_path", lambda: module.validation_problems)]
    if cfg.get("study") is not None:
        reads.append(("test_path", lambda: module.test_problems))
    problems, failed = [], set()
    for key, read in reads:
        if not data.get(key) or (key != "train_path" and not evaluator) or data[key] in failed:
            continue  # (a source that failed for one key is not reported again for the next)
        try:
            records = read()
        except UserError as err:
            problems.append(str(err))
            failed.add(data[key])
            continue
        if key == "train_path" and cfg.get("study") is None:
            # train.py: the batch that will run, against what is left after the hold-out (a study
            # checks its search space's batch sizes instead, lit_sft.study.run.check_data).
            n = len(records)
            held = module.held_out(n)
            if data["batch_size"] > n - held:
                problems.append(batch_problem(data["batch_size"], data["batch_size"],
                                              f"the {n - held} training records ({n} in {data['train_path']}, {held} held out "
                                              f"for eval/loss: data.eval_size={module.hparams.eval_size}, at most "
                                              f"data.eval_max_fraction={module.hparams.eval_max_fraction:g} of them)"))
    return problems


def batch_problem(batch: int, per_device: int, records: str) -> str:
    """The one message for a batch that the training records cannot fill."""
    per = f" ({per_device} per device)" if per_device != batch else ""
    return f"data.batch_size={batch}{per} is larger than {records}"
