"""The console is for the user: groundlab's own lines and one progress bar. Library chatter that does not
concern them (Lightning's accelerator report and tips, the duplicate of each Lightning line through Hydra's
root handler, transformers' weight-loading bars and load tables, deprecation notices of library internals) is
turned off here, once per run; warnings that concern the user stay."""

from __future__ import annotations

import logging
import warnings

# (message regex, why it does not concern the user)
IGNORED_WARNINGS = (
    (r".*isinstance\(treespec, LeafSpec\)", "a torch deprecation inside Lightning"),
    (r"Found \d+ module\(s\) in eval mode", "frozen parts (train.freeze, the MAL teacher) are in eval mode on purpose"),
    (r"You have overridden `transfer_batch_to_device`", "ours moves the targets; the data module has none"),
    (r"Experiment logs directory .* exists and is not empty", "a resumed run appends to its CSV log"),
    (r"The `srun` command is available", "Lightning's SLURM hint"),
)


def quiet_libraries() -> None:
    """Lightning at WARNING through Hydra's handler only (no second copy), transformers at ERROR without
    progress bars, and the warnings above ignored."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        for handler in list(logger.handlers):  # Lightning adds its own stream handler: lines came out twice
            logger.removeHandler(handler)
        logger.propagate = True
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for pattern, _ in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
