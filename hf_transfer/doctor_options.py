"""The data doctor's recipe options: whether a run checks its data, what it excludes, and the checks' settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import HFTransferError

EXCLUDE_CHOICES = ("leaks", "label_issues", "both")
SPLIT_ORDER = ("train", "validation", "test")
# The options that change what data_report.json says (the others choose whether the doctor runs and what a run excludes).
REPORT_OPTIONS = ("doctor_folds", "doctor_duplicate_threshold", "doctor_min_class_images", "doctor_sheet_size")
# Calibrated on EfficientNet-Lite0 features of the cats-vs-dogs mirror (4,000 photos, 256 px short side) and copies of 60
# of them (benchmarks/doctor.py --calibrate): exact copies 1.0; JPEG quality 50 at least 0.941, 30 at least 0.900; resized
# to 3/4 of the side at least 0.946, to 5/8 0.895, to 1/2 0.836 (median 0.913, 63% found). The closest distinct photos
# reach 0.889 (the same dog, two shots); above them sit only the mirror's two true duplicates (0.98).
DUPLICATE_THRESHOLD = 0.90
class DoctorError(HFTransferError, ValueError):
    """A dataset or option the data doctor cannot check; the message says what to change."""


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
        metadata={"help": (
            "Cosine similarity of power-normalised backbone features at or above which two images count as copies. 0.90 (Lite0, "
            "cats-vs-dogs mirror) finds every exact copy, copy resized to 3/4 of the side and JPEG re-encoded at quality 30-75, "
            "2 in 3 copies resized to half the side, and no pair of distinct photos (the closest reach 0.889). Photos, not "
            "thumbnails: on CIFAR-10's 32 px images a JPEG-50 re-encode falls below it. Where more than 10%% of the images have "
            "a neighbour this close (images unlike the backbone's), the features are not used for copies, and the report says "
            "so; a perceptual hash finds copies either way."
        )},
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
        unknown = [split for split in self.excluded_splits() if split not in SPLIT_ORDER]
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

    def excluded_splits(self) -> list[str]:
        return [split.strip() for split in str(self.exclude_flagged_from).split(",") if split.strip()]
