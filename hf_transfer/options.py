"""Every option of a recipe and of `hf-transfer train`'s command line: the argument dataclasses with their help, their
per-field checks, and our defaults that differ from Trainer's (`TRAINING_DEFAULTS`, each with its reason).

Sections, as in the transformers example scripts (`HfArgumentParser`): data, model, freeze, run, doctor, and
`transformers.TrainingArguments` (`HfTransferTrainingArguments`). Rules that tie options of several sections together
are checked once, in `validation.py`. Importing this module loads no model, dataset or training code: `--help` is quick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from .errors import DatasetError, DoctorError
from .precision import CHOICES as PRECISIONS
from .recipe_yaml import load_recipe_yaml
from .schedules import SCHEDULES, STEP, schedule_kwargs_mapping
from .stage_grammar import TARGET_ALIASES, check_stages, check_target

# ---- data --------------------------------------------------------------------------------------------------------------
AUGMENTATIONS = ("default", "none", "randaugment", "trivialaugment")
RESIZE_ON_DEVICE = ("auto", "true", "false")
LIMITS = {"max_train_samples": "train", "max_eval_samples": "validation", "max_test_samples": "test"}


@dataclass
class DataArguments:
    dataset: str = field(
        default=None,
        metadata={"help": "A Hub dataset id (`uoft-cs/cifar10`), a local folder (parquet export, or image folder with one sub-folder per "
                          "class; linked folders are followed) or one .parquet file (the train split; the others are carved from it)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's configuration name, if it has several."})
    image_column: str | None = field(default=None, metadata={"help": "Image column; found by feature type when unset."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (a ClassLabel); found by feature type when unset."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str | None = field(default=None, metadata={"help": "Validation split; `validation`/`valid`/`val` if present, else carved from train."})
    test_split: str | None = field(default=None, metadata={"help": "Held-out test split; `test` if present, else carved from train."})
    validation_size: float = field(default=0.1, metadata={"help": "Fraction (<1) or number of train images carved out for validation when there is no such split."})
    test_size: float = field(default=0.1, metadata={"help": "Fraction (<1) or number of train images carved out for test when there is no such split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the train split to this many images (debugging, quick runs)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation split to this many images."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Truncate the test split to this many images."})
    augmentation: str = field(default="default", metadata={"help": f"Train-time augmentation: {' | '.join(AUGMENTATIONS)}. `default` = random-resized-crop + flip."})
    crop_min_scale: float = field(default=0.35, metadata={"help": "Smallest area fraction kept by the random-resized-crop."})
    skip_unreadable_images: bool = field(default=True, metadata={"help": "Skip (and count) images that cannot be decoded; false = stop and list them."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the dataset as a stream (datasets' `streaming=True`: Hub datasets, local parquet, image folders, "
                          "webdataset shards), never copied to disk: for datasets bigger than the disk. Needs `max_steps`; validation "
                          "and test are named splits or a number of images (`validation_size: 500`) from the start of the stream. See "
                          "docs/streaming.md."},
    )
    shuffle_buffer_size: int = field(
        default=1000,
        metadata={"help": "With `streaming`: training images are drawn at random from a buffer of this many (the shard order is shuffled "
                          "too, every pass). Larger mixes better and takes more memory (and checkpoint space: the buffer is saved)."},
    )
    resize_on_device: str = field(
        default="auto",
        metadata={"help": "Send images of one size to the training device at that size and resize, crop and normalise them there, "
                          "batched (the CPU only decodes): auto = on a CUDA device when the images are smaller than the model's input "
                          "(CIFAR's 32 px) | true | false. `default` augmentation is then a random shift by 1/8 of the side (reflect "
                          "padding) + flip."},
    )

    def __post_init__(self):
        self.resize_on_device = str(self.resize_on_device).lower()  # YAML `true` arrives as True or "True"
        if self.resize_on_device not in RESIZE_ON_DEVICE:
            raise ValueError(f"`resize_on_device: {self.resize_on_device}` is not one of {' | '.join(RESIZE_ON_DEVICE)}.")
        # Checked here, when the options are read: before any data is loaded, and naming the option the user set.
        for option in ("validation_size", "test_size"):
            size = getattr(self, option)
            if not size > 0:  # also NaN
                raise DatasetError(
                    f"`{option}: {number_text(size)}` carves no images. Give a fraction of the train split below 1 (0.1 = 10%) "
                    "or a whole number of images (e.g. 50)."
                )
            if size >= 1 and not float(size).is_integer():  # also inf
                raise DatasetError(
                    f"`{option}: {number_text(size)}` is neither a fraction below 1 nor a whole number of images. "
                    "Give e.g. 0.1 (10% of the train split) or 50 (images)."
                )
        if self.shuffle_buffer_size < 1:
            raise DatasetError(f"`shuffle_buffer_size: {self.shuffle_buffer_size}` holds no images. Give a number >= 1, e.g. 1000.")
        for option, split in LIMITS.items():
            limit = getattr(self, option)
            if limit is not None and limit < 1:
                raise DatasetError(
                    f"`{option}: {limit}` would leave the {split} split without images. "
                    f"Give a positive number of images, or leave `{option}` unset to use the whole split."
                )


def number_text(value: float) -> str:
    """An option's number as the user wrote it: 1000 rather than 1000.0 or 1e+03."""
    return str(int(value)) if float(value).is_integer() else str(value)


# ---- model -------------------------------------------------------------------------------------------------------------

@dataclass
class ModelArguments:
    model: str = field(
        default="timm/tf_efficientnet_lite0.in1k",
        metadata={"help": "A timm name (`resnet50`), a Hub id (`timm/resnet50.a1_in1k`, `google/vit-base-patch16-224`) or a local model folder."},
    )
    pretrained: bool = field(default=True, metadata={"help": "Start from pretrained weights (false: random init, for smoke tests and throughput)."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the Hub model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the model repo to run. Off unless you trust the repo."})
    image_size: int | None = field(
        default=None,
        metadata={"help": "Input resolution in pixels (square), e.g. 160 (default: the model's own). Resize and crop scale with it; "
                          "config.json and preprocessor_config.json record it, so `pipeline` and timm preprocess alike."},
    )
    image_size_schedule: list[int] | None = field(
        default=None,
        metadata={"help": "Progressive resizing: the training image size of each epoch in turn, e.g. `[96, 112]` trains epoch 1 at "
                          "96 px, epoch 2 at 112 px and the rest at the input size (`image_size`, else the model's own). Training "
                          "batches are resized down on the training device; evaluation, test and the saved model use the input "
                          "size. all_results.json and the card state the size each epoch trained at."},
    )
    drop_rate: float | None = field(
        default=None,
        metadata={"help": "Dropout before the classifier, 0 <= p < 1 (timm's `drop_rate`; a transformers model's `classifier_dropout`), "
                          "saved in config.json. Default: the model's own."},
    )

    def __post_init__(self):
        if self.image_size is not None and not (isinstance(self.image_size, int) and self.image_size >= 16):
            raise ValueError(f"`image_size` must be a whole number of pixels >= 16, e.g. 160, not {self.image_size!r}.")
        schedule = self.image_size_schedule
        if schedule is not None and not (isinstance(schedule, list) and schedule
                                         and all(isinstance(size, int) and not isinstance(size, bool) and size >= 16 for size in schedule)):
            raise ValueError(f"`image_size_schedule` must be a list of whole numbers of pixels >= 16, one per epoch, e.g. [96, 112], "
                             f"not {schedule!r}.")
        if self.drop_rate is not None and not 0 <= self.drop_rate < 1:
            raise ValueError(f"`drop_rate` is a dropout probability, 0 <= drop_rate < 1, not {self.drop_rate!r}.")


# ---- freeze ------------------------------------------------------------------------------------------------------------

STRATEGIES = ("head_only", "last_n", "full", "patterns", "staged")
BATCHNORM_MODES = ("frozen", "eval", "train")
PRESETS = {
    "linear_probe": {"freeze": "head_only"},
    # fastai's fine_tune: one epoch of head, then everything with discriminative learning rates
    "fastai": {"freeze": "staged", "stages": [{"at_epoch": 0, "train": "head"}, {"at_epoch": 1, "train": "all"}]},
    # layer-wise learning-rate decay as in BEiT / timm's --layer-decay
    "llrd": {"freeze": "full", "layer_decay": 0.75},
}
FASTAI_LR_SPREAD = 100  # fastai's slice(lr / 100, lr): the stem learns 100x slower than the head


@dataclass
class FreezeArguments:
    freeze: str = field(
        default="head_only",
        metadata={"help": f"What trains: {' | '.join(STRATEGIES)} (`last_n:<k>` = head + last k blocks), or a preset: {' | '.join(PRESETS)}."},
    )
    stages: str | None = field(
        default=None,
        metadata={"help": "For `staged`: a YAML list such as "
                          "`[{at_epoch: 0, train: head}, {at_plateau: 2, train: 'last_n:2', lr_scale: 0.1}]`. Each stage starts "
                          "`at_epoch` or `at_step` (fixed), or `at_plateau: k` (once `metric_for_best_model` has not improved for k "
                          "evaluations); `lr_scale` multiplies every learning rate from that stage on."},
    )
    batchnorm: str = field(
        default="frozen",
        metadata={"help": "BatchNorm statistics: `frozen` (kept in frozen blocks, updated in trained ones), `eval` (kept everywhere: "
                          "small data, low resolution, staged unfreezing) or `train` (updated everywhere, frozen blocks too)."},
    )
    layer_decay: float | None = field(default=None, metadata={"help": "Learning rate of a block = lr * layer_decay ** (depth from the head), 0 < layer_decay <= 1."})
    train_patterns: list[str] | None = field(default=None, metadata={"help": "For `patterns`: glob(s) over parameter names that train besides the head (default: all)."})
    freeze_patterns: list[str] | None = field(default=None, metadata={"help": "For `patterns`: glob(s) over parameter names kept frozen (wins over train_patterns)."})

    def __post_init__(self):
        self.preset = self.freeze if self.freeze in PRESETS else None
        if self.preset:
            defaults = {f.name: f.default for f in fields(self)}
            for key, value in PRESETS[self.preset].items():
                if key == "freeze" or getattr(self, key) == defaults[key]:  # what the user set wins
                    setattr(self, key, value)
        if isinstance(self.stages, str):
            self.stages = load_recipe_yaml(self.stages, "`stages`")  # no duplicate keys or alias bombs, as in a recipe file
        for key in ("train_patterns", "freeze_patterns"):
            if isinstance(getattr(self, key), str):  # `patterns: {train: "*.blocks.5.*"}` in YAML
                setattr(self, key, [getattr(self, key)])
        # Settled once, like `preset`: `freeze` is the user's text as given (recorded as such), `strategy` the one name the
        # code uses for what it selects (`last_n` for `last_n:2`), `schedule` its stages (one from step 0 if static).
        self.strategy = self.freeze.split(":")[0]
        self._validate()
        self.schedule = (
            [{**stage, "train": TARGET_ALIASES.get(stage["train"], stage["train"])} for stage in self.stages]
            if self.strategy == "staged" else [{"at_step": 0, "train": TARGET_ALIASES.get(self.strategy, self.freeze)}]
        )
        self._check_patterns()

    def _validate(self) -> None:
        choices = f"Choose one of {', '.join(STRATEGIES)} (e.g. `last_n:2`) or a preset ({', '.join(PRESETS)})."
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown freeze strategy '{self.freeze}'. {choices}")
        if self.strategy == "last_n" or ":" in self.freeze:
            check_target(self.freeze, where="`freeze`")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"`batchnorm` must be one of {', '.join(BATCHNORM_MODES)}, not '{self.batchnorm}'.")
        for key in ("train_patterns", "freeze_patterns"):
            patterns = getattr(self, key)
            if patterns is not None and not (isinstance(patterns, list) and all(isinstance(pattern, str) for pattern in patterns)):
                raise ValueError(f"`{key}` must be a list of globs over parameter names, e.g. ['*.blocks.5.*'], not {patterns!r}.")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"`layer_decay` must be in (0, 1] (e.g. 0.7: each block deeper from the head learns 0.7x as fast), not {self.layer_decay}.")
        if self.strategy == "staged":
            check_stages(self.stages)
        elif self.stages:
            raise ValueError(f"`stages` only apply to `freeze: staged`, but freeze is '{self.freeze}'.")

    def _check_patterns(self) -> None:
        uses_patterns = "patterns" in [stage["train"] for stage in self.schedule]
        if uses_patterns and not (self.train_patterns or self.freeze_patterns):
            raise ValueError("`patterns` needs `train_patterns` and/or `freeze_patterns`, e.g. --train_patterns '*.blocks.5.*' --freeze_patterns '*stem*'.")
        if not uses_patterns and (self.train_patterns or self.freeze_patterns):
            raise ValueError("`train_patterns` / `freeze_patterns` only apply to `freeze: patterns` (or a stage that trains `patterns`).")

    def decay_for(self, depth: int) -> float | None:
        """The layer decay to use for a model `depth` blocks deep below its head."""
        if self.layer_decay is None and self.preset == "fastai":
            return (1 / FASTAI_LR_SPREAD) ** (1 / max(depth, 1))
        return self.layer_decay


# ---- run -------------------------------------------------------------------------------------------------------------

@dataclass
class RunArguments:
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in output_dir (after a crash or kill)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an output_dir that holds a different run."})
    feature_cache: bool = field(default=True, metadata={"help": "With a frozen backbone (head_only, batchnorm frozen): compute its features once, cache them, train the head on them."})
    feature_cache_views: int = field(default=0, metadata={"help": "Feature cache train views: 0 = un-augmented; K = K fixed augmented views per image, epoch e uses view e mod K."})
    inference_precision: str = field(
        default="auto",
        metadata={"help": "Precision of passes without gradients (feature extraction, evaluation, test): `auto` = bf16 autocast where "
                          "the CPU or GPU computes bf16 natively, else fp32 (the decision goes into all_results.json); `fp32`; `bf16`.",
                  "choices": list(PRECISIONS)},
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop once `metric_for_best_model` has not improved for this many evaluations (Trainer's "
                          "EarlyStoppingCallback). In a staged plan it counts in the last stage only."},
    )
    early_stopping_threshold: float = field(default=0.0, metadata={"help": "How much `metric_for_best_model` must improve to count as better."})
    eval_test_each_epoch: bool = field(
        default=False,
        metadata={"help": "Also score the test split after every evaluation (`test_*` in the log and the card's per-epoch table); "
                          "the best checkpoint is still chosen on the validation split."},
    )
    selection: str | None = field(
        default=None,
        metadata={"help": "The selection.json of the `hf-transfer select` that chose `model` (recipe.selected.yaml sets it): "
                          "checked to name this model and dataset, copied into the model repo, and its leaderboard shown in the "
                          "card's \"Why this backbone\"."},
    )


# ---- doctor ----------------------------------------------------------------------------------------------------------

EXCLUDE_CHOICES = ("leaks", "label_issues", "both")
SPLIT_ORDER = ("train", "validation", "test")
# The options that change what data_report.json says (the others choose whether the doctor runs and what a run excludes).
REPORT_OPTIONS = ("doctor_folds", "doctor_duplicate_threshold", "doctor_min_class_images", "doctor_sheet_size")
# Calibrated by benchmarks/doctor.py --calibrate (Lite0 features, the 4,000 photos of the cats-vs-dogs mirror and copies of
# 60 of them): JPEG quality 30 at least 0.900, resized to 5/8 of the side 0.895; the closest distinct photos reach 0.889.
DUPLICATE_THRESHOLD = 0.90


@dataclass
class DoctorArguments:
    data_doctor: bool = field(
        default=True,
        metadata={"help": "Check the data (label issues, near-duplicates and leaks, class balance) at the start of every run whose "
                          "features are cached; `hf-transfer doctor` runs the same check alone."},
    )
    exclude_flagged: str | None = field(
        default=None,
        metadata={"help": f"Remove flagged images before training: {' | '.join(EXCLUDE_CHOICES)}. Leaks: the train copy of an image "
                          "that is also in validation/test, with all its copies; label_issues: images whose label is likely wrong, "
                          "and copies that carry different labels. Only from the splits in `exclude_flagged_from`; refused when a "
                          "split would lose every image of a class."},
    )
    exclude_flagged_from: str = field(
        default="train",
        metadata={"help": "Comma-separated splits that `exclude_flagged` removes images from: train (default), validation, test."},
    )
    doctor_folds: int = field(default=5, metadata={"help": "Folds of the out-of-fold probe behind the label-issue check (seeded)."})
    doctor_duplicate_threshold: float = field(
        default=DUPLICATE_THRESHOLD,
        metadata={"help": "Cosine similarity of power-normalised backbone features at or above which two images count as copies. 0.90 "
                          "(Lite0, cats-vs-dogs mirror) finds every exact copy, copy resized to 3/4 of the side and JPEG re-encoded at "
                          "quality 30-75, 2 in 3 copies resized to half the side, and no pair of distinct photos (the closest reach "
                          "0.889). Photos, not thumbnails: on CIFAR-10's 32 px images a JPEG-50 re-encode falls below it. Where more "
                          "than 10%% of the images have a neighbour this close (images unlike the backbone's), the features are not used "
                          "for copies, and the report says so; a perceptual hash finds copies either way."},
    )
    doctor_min_class_images: int = field(default=10, metadata={"help": "Flag training classes with fewer images than this."})
    doctor_sheet_size: int = field(default=24, metadata={"help": "How many label suspects the contact sheet shows (and up to 8 leaks)."})

    def __post_init__(self):
        if self.exclude_flagged in ("", "none", "None", "false", "False", False):
            self.exclude_flagged = None
        if self.exclude_flagged is not None and self.exclude_flagged not in EXCLUDE_CHOICES:
            raise DoctorError(f"`exclude_flagged: {self.exclude_flagged}` is not one of {' | '.join(EXCLUDE_CHOICES)} "
                              "(or unset: exclude nothing).")
        if self.exclude_flagged and not self.data_doctor:
            raise DoctorError(f"`exclude_flagged: {self.exclude_flagged}` removes what the data doctor flags, but `data_doctor: false` "
                              "turns the doctor off. Remove one of the two.")
        self.excluded_splits = [split.strip() for split in str(self.exclude_flagged_from).split(",") if split.strip()]  # settled once
        unknown = [split for split in self.excluded_splits if split not in SPLIT_ORDER]
        if unknown:
            raise DoctorError(f"`exclude_flagged_from: {self.exclude_flagged_from}` names {unknown}; "
                              f"give splits among {', '.join(SPLIT_ORDER)}.")
        if self.doctor_folds < 2:
            raise DoctorError(f"`doctor_folds: {self.doctor_folds}`: out-of-fold probabilities need at least 2 folds (5 is usual).")
        if not 0 < self.doctor_duplicate_threshold <= 1:
            raise DoctorError(f"`doctor_duplicate_threshold: {self.doctor_duplicate_threshold}` is a cosine similarity: give a number "
                              f"in (0, 1], e.g. {DUPLICATE_THRESHOLD}.")
        if self.doctor_min_class_images < 0 or self.doctor_sheet_size < 0:
            raise DoctorError("`doctor_min_class_images` and `doctor_sheet_size` count images: give a number >= 0.")


# ---- training ------------------------------------------------------------------------------------------------------

# Values that would train nothing, or not what was asked, and that neither argparse nor TrainingArguments refuses
# (TrainingArguments refuses only warmup_steps < 0, without saying what to write).
VALUE_RANGES = {
    "learning_rate": (lambda v: 0 < v < math.inf, "give a number > 0, e.g. 1e-3 (0 or less trains nothing)"),
    "num_train_epochs": (lambda v: 0 <= v < math.inf, "give a number of epochs > 0, e.g. 3"),  # 0: see validation.check_recipe
    "max_steps": (lambda v: v > 0 or v == -1, ("give a number of steps > 0, or -1 to train for `num_train_epochs` "
                                               "(Trainer would silently ignore it and train every epoch)")),
    "per_device_train_batch_size": (lambda v: v >= 1, "give a batch size >= 1, e.g. 32"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "give a batch size >= 1, e.g. 64"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "give a whole number >= 1 (1 = no accumulation)"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "give a number >= 0, e.g. 0.01 (0 = none)"),
    "warmup_steps": (lambda v: 0 <= v < math.inf, "give a fraction of the training steps below 1 (e.g. 0.1) or a number of steps >= 1"),
}


@dataclass
class HfTransferTrainingArguments(TrainingArguments):
    """`TrainingArguments` whose `lr_scheduler_type` also takes `step` (lr x gamma every `step_size` epochs)."""

    lr_scheduler_type: str = field(
        default="linear",
        metadata={
            "help": "Learning-rate schedule: any of Trainer's, or `step` (multiply by `gamma` every `step_size` epochs: the rate "
                    "torch's StepLR gives stepped once per epoch, applied per optimizer step by a LambdaLR; set them with "
                    "`lr_scheduler_kwargs: {step_size: 2, gamma: 0.1}`). `warmup_steps` applies to every schedule.",
            "choices": SCHEDULES,
        },
    )

    def __post_init__(self):
        for key, (allowed, requirement) in VALUE_RANGES.items():  # before Trainer's own checks, which say less
            value = getattr(self, key)
            if not allowed(value):
                raise ValueError(f"Option `{key}`: {number_text(value)} is out of range: {requirement}. Fix it in the recipe or on "
                                 "the command line.")
        step = str(self.lr_scheduler_type) == STEP
        if step:  # TrainingArguments accepts only its own names; it checks nothing else about the schedule
            self.lr_scheduler_type = "constant"
        schedule = STEP if step else getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)
        self.lr_scheduler_kwargs = schedule_kwargs_mapping(self.lr_scheduler_kwargs, schedule)
        super().__post_init__()
        if step:
            self.lr_scheduler_type = STEP


# Our defaults that differ from Trainer's, each with its reason; a recipe or the command line overrides any.
TRAINING_DEFAULTS = {
    "output_dir": "outputs/run",  # Trainer has none: a run always needs a folder
    "eval_strategy": "epoch",  # Trainer: no evaluation; a classifier is judged on validation every epoch
    "save_strategy": "epoch",  # Trainer: every 500 steps; an epoch is the natural unit of an image dataset
    "logging_strategy": "epoch",  # the card's per-epoch table reads one log line per epoch
    "load_best_model_at_end": True,  # publish the best validation epoch, not whichever came last
    "metric_for_best_model": "accuracy",  # Trainer: loss; what users of a classifier compare
    "save_total_limit": 2,  # the best and the last checkpoint: resumable without filling the disk
    "remove_unused_columns": False,  # the transform needs the raw image column
    "per_device_train_batch_size": 32,  # Trainer: 8; image backbones train stably and faster at 32
    "per_device_eval_batch_size": 64,  # Trainer: 8; passes without gradients fit twice the batch
    "learning_rate": 1e-3,  # Trainer: 5e-5 (for language models); a new head needs a higher rate
    "num_train_epochs": 3,  # Trainer's today; pinned (and written to recipe.yaml) so a later Trainer cannot change a run
    "warmup_steps": 0.1,  # 10% warm-up protects pretrained weights from the first large updates
    "weight_decay": 0.01,  # Trainer: 0; AdamW's usual decay for fine-tuning
    "report_to": "none",  # nothing leaves the machine unless asked (older Trainers reported to every installed tracker)
    # Trainer's filter reads every step's loss on the host (a GPU sync per step); SafeTrainer stops on a NaN/inf loss instead.
    "logging_nan_inf_filter": False,
}

ARGUMENT_CLASSES = (DataArguments, ModelArguments, FreezeArguments, RunArguments, DoctorArguments, HfTransferTrainingArguments)
