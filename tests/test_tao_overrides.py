"""TAO users carry their spec keys over: every override set of ../shared/tao_spec_overrides.md whose capability
exists composes as written onto `model=<m> action=<a>` and passes the start-up checks (TAO's older MAL names
resolved onto our canonical keys, groundlab.config.aliases). Rows that need a capability we lack (deploy, Mask
Grounding DINO training, referring segmentation) would be listed as skipped with what they need; none is left."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import pytest
from omegaconf import OmegaConf

from groundlab.config import check_config
from groundlab.config.aliases import ALIASES
from groundlab.recipes import RECIPES

SPEC = Path(__file__).resolve().parents[2] / "shared" / "tao_spec_overrides.md"
PLACEHOLDERS = ("P", "C", "X", "O", "L")  # pretrained / checkpoint / engine / onnx / label dump paths


class OverrideSet(NamedTuple):
    model: str
    action: str
    overrides: List[str]
    needs: str  # "—" (exists today), or the capability the set needs
    line: int

    @property
    def id(self) -> str:
        return f"{self.model}-{self.action}-L{self.line}"


def _split_cells(line: str) -> List[str]:
    """Cells of a markdown table row (pipes inside backticks are not separators)."""
    cells, cell, in_code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
    return cells + [cell.strip()]


def parse_spec(text: str) -> List[OverrideSet]:
    """One OverrideSet per (row, action): "evaluate / inference" with `A` / `B` gives two; a "+ gdino's train
    set" suffix appends that model's first set of the action."""
    sets: List[OverrideSet] = []
    model: Optional[str] = None
    for number, line in enumerate(text.splitlines(), 1):
        heading = re.match(r"^##\s+(\w+)", line)
        if heading:
            model = heading.group(1)
            continue
        if model is None or not line.startswith("|"):
            continue
        cells = _split_cells(line)
        if len(cells) != 3 or cells[0] in ("action", "") or set(cells[0]) <= {"-"}:
            continue
        actions = [a.split("(")[0].strip() for a in cells[0].split("/")]
        codes = re.findall(r"`([^`]*)`", cells[1])
        if len(codes) < len(actions):
            codes = codes * len(actions)
        base = re.search(r"\+ (\w+)'s (\w+) set", cells[1])
        for action, code in zip(actions, codes):
            overrides = shlex.split(code)
            if base:
                first = next(s for s in sets if s.model == base.group(1) and s.action == base.group(2))
                overrides = first.overrides + overrides
            sets.append(OverrideSet(model, action, overrides, cells[2], number))
    return sets


SETS = parse_spec(SPEC.read_text()) if SPEC.is_file() else []


# capabilities a "needs" cell names that exist (for these actions): Mask Grounding DINO trains, evaluates and infers;
# deploy: action=export, TensorRT engine building (TAO's gen_trt_engine keys), quantize, and evaluate / inference
# taking an exported file (onnx_file, trt_engine); referring segmentation: region queries, VG data, its metrics
AVAILABLE = {"mask_gdino": {"train", "inference"},
             "deploy": {"export", "gen_trt_engine", "quantize", "evaluate", "inference"},
             "referring segmentation": {"train", "evaluate", "inference"}}


def _why_not(s: OverrideSet) -> Optional[str]:
    if not s.needs.startswith("—") and s.action not in AVAILABLE.get(s.needs, ()):
        return f"needs {s.needs}"
    if (s.model, s.action) not in RECIPES:
        return f"model={s.model} action={s.action} has no recipe yet"
    return None


def _params():
    if not SETS:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{SPEC} is absent"), id="no-spec")]
    return [pytest.param(s, id=s.id, marks=[pytest.mark.skip(reason=_why_not(s))] if _why_not(s) else [])
            for s in SETS]


def with_paths(overrides: List[str], root: Path) -> List[str]:
    """The set with its placeholder paths (T/..., E/..., P, C, X, O, L) made real paths under `root`."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if value in PLACEHOLDERS:
            value = str(root / value)
        value = re.sub(r"(?<![\w/.])([TE])/", lambda m: f"{root / m.group(1)}/", value)
        out.append(f"{key}={value}")
    return out


def dataset_choice(s: OverrideSet) -> List[str]:
    """The `dataset=` choice a set goes with: MAL reads dataset=mal_coco; a Grounding DINO set naming annotated
    sources reads ODVG (a .jsonl) or COCO, images to label read dataset=raw; others keep the default."""
    keys = " ".join(s.overrides)
    if s.model == "mal":
        return ["dataset=mal_coco"]
    if re.search(r"dataset\.(train|val|test)_data_sources", keys):
        return ["dataset=odvg" if ".jsonl" in keys else "dataset=coco"]
    if "dataset.infer_data_sources" in keys:
        return ["dataset=raw"]
    return []


def _canonical(model: str, key: str) -> str:
    return ALIASES.get(model, {}).get(key, key)


def _same(given: str, value) -> bool:
    if isinstance(value, bool):
        return given.lower() == str(value).lower()
    try:
        return float(given) == float(value)
    except (TypeError, ValueError):
        return given == str(value)


def test_the_spec_parses_into_sets():
    if not SETS:
        pytest.skip(f"{SPEC} is absent")
    assert {s.model for s in SETS} == {"gdino", "mask_gdino", "mal"}
    assert {(s.model, s.action) for s in SETS if _why_not(s) is None} >= {
        ("gdino", "train"), ("gdino", "evaluate"), ("gdino", "inference"), ("gdino", "export"),
        ("mask_gdino", "inference"), ("mal", "train"), ("mal", "evaluate"), ("mal", "inference")}
    fsdp = [s for s in SETS if "train.distributed_strategy=fsdp" in s.overrides]
    assert fsdp and all("train.precision=bf16" in s.overrides for s in fsdp)


@pytest.mark.parametrize("spec_set", _params())
def test_tao_override_set_composes_and_passes_start_up_checks(compose, tmp_path, spec_set):
    s = spec_set
    if s.action == "train" and "train_data_sources" not in " ".join(s.overrides) and s.model != "mal":
        # a row that adds to a train command (region queries): on top of the model's first train set
        first = next(t for t in SETS if (t.model, t.action) == (s.model, "train"))
        s = OverrideSet(s.model, s.action, first.overrides + s.overrides, s.needs, s.line)
    overrides = with_paths(s.overrides, tmp_path)
    cfg = compose([f"model={s.model}", f"action={s.action}"] + dataset_choice(s) + overrides)
    check_config(cfg)
    for o in overrides:  # every scalar the user set reaches its (canonical) key
        key, _, value = o.partition("=")
        if value[:1] in ("[", "{"):
            continue
        got = OmegaConf.select(cfg, _canonical(s.model, key))
        assert _same(value, got), f"{key}={value} composed as {_canonical(s.model, key)}={got}"


@pytest.mark.parametrize("model", ["gdino", "mask_gdino", "mal"])
def test_a_models_train_sets_compose_together(compose, tmp_path, model):
    """TAO's train example is split over rows: all of them at once is one command too."""
    rows = [s for s in SETS if s.model == model and s.action == "train" and _why_not(s) is None]
    if not rows:
        pytest.skip(f"{SPEC} is absent or has no {model} train set")
    merged = OverrideSet(model, "train", [o for s in rows for o in s.overrides], "—", 0)
    cfg = compose([f"model={model}", "action=train"] + dataset_choice(merged) + with_paths(merged.overrides, tmp_path))
    check_config(cfg)


# ------------------------------------------------------------------------------------------------ aliases
MAL = ["model=mal", "dataset=mal_coco", "action=train"]


@pytest.mark.parametrize(
    "alias, value, canonical, expected",
    [
        ("train.save_every_k_epoch", "5", "train.checkpoint_interval", 5),
        ("train.val_interval", "2", "train.validation_interval", 2),
        ("model.load_mask", "false", "dataset.load_mask", False),
        ("model.crop_size", "256", "dataset.crop_size", 256),
        ("train.test_margin_rate", "[0.5,0.4]", "model.test_margin_rate", [0.5, 0.4]),
        ("train.mask_thres", "[0.2]", "model.mask_thres", [0.2]),
    ],
)
def test_tao_alias_sets_its_canonical_key(compose, alias, value, canonical, expected, caplog):
    cfg = compose(MAL + [f"{alias}={value}"])
    with caplog.at_level("INFO", logger="groundlab.config.aliases"):
        check_config(cfg)
    got = OmegaConf.select(cfg, canonical)
    assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == expected
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and alias in lines[0] and canonical in lines[0]


def test_alias_table_names_real_optional_keys(compose):
    """Each alias is an Optional key left None by default; its canonical key exists for that model."""
    assert set(ALIASES) == {"mal"}
    cfg = compose(MAL)
    for alias, canonical in ALIASES["mal"].items():
        assert OmegaConf.select(cfg, alias, default="absent") is None, alias
        assert OmegaConf.select(cfg, canonical, default=None) is not None, canonical


def test_the_alias_wins_over_a_preset_value(compose, caplog):
    """A preset (dataset=mal_synthetic sets crop_size 128) or an experiment may have set the canonical key: the
    TAO alias the user gave wins, with one log line naming both."""
    cfg = compose(["model=mal", "dataset=mal_synthetic", "model.crop_size=256", "experiment=mal_quickstart",
                   "train.mask_thres=[0.3]"])
    with caplog.at_level("INFO"):
        check_config(cfg)
    assert cfg.dataset.crop_size == 256 and list(cfg.model.mask_thres) == [0.3]
    assert "model.crop_size=256 (TAO's name) sets dataset.crop_size (was 128)" in caplog.text


def test_alias_equal_to_canonical_is_fine(compose):
    cfg = compose(MAL + ["train.val_interval=4", "train.validation_interval=4"])
    check_config(cfg)
    assert cfg.train.validation_interval == 4


def test_alias_from_run_py_reaches_the_resolved_config(tmp_path):
    """run.py applies the alias before the run record: the resolved config holds the canonical value."""
    from conftest import run_py

    proc = run_py("model=mal", "dataset=mal_coco", "action=train", "train.save_every_k_epoch=7",
                  "train.num_epochs=0", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "train.num_epochs=0 must be >= 1" in proc.stderr
    assert "train.save_every_k_epoch=7 (TAO's name) sets train.checkpoint_interval" in proc.stdout + proc.stderr


def test_gdino_schemas_have_no_aliases(compose):
    for key in ("train.save_every_k_epoch", "model.load_mask", "train.mask_thres"):
        assert OmegaConf.select(compose(), key, default="absent") == "absent"


def test_no_row_is_skipped():
    """Every row composes: the mask head, deploy (export, gen_trt_engine, quantize, evaluate / inference on an
    exported file) and referring segmentation (region queries, VG evaluation and inference)."""
    if not SETS:
        pytest.skip(f"{SPEC} is absent")
    reasons: Dict[str, str] = {s.id: _why_not(s) for s in SETS if _why_not(s)}
    assert not reasons, reasons
