"""Find a cohort's acquisitions and name their BIDS-derivative outputs.

Two inputs:

- a BIDS dataset: every ``sub-X[/ses-Y]/anat/*_echo-N_part-phase_MEGRE.nii[.gz]`` set is one acquisition
  (its echoes, its ``part-mag`` twins and their JSON sidecars); ``acq-``/``run-`` entities keep runs apart;
- a CSV manifest of local fields (``--input localfield``): columns ``subject``, ``field``, ``mask`` and
  optionally ``session``, ``magnitude`` (paths relative to the CSV's folder). Fields are in ppm.

Input paths are made absolute here, so a worker whose working folder differs (PBS and SGE jobs start in
``$HOME``) reads the same files and names them the same way in the sidecars.

Outputs follow BIDS derivatives: ``sub-X[/ses-Y]/anat/<prefix>_Chimap.nii.gz`` (ppm), the local field
``<prefix>_desc-local_fieldmap.nii.gz`` (ppm) and ``<prefix>_desc-qsm_mask.nii.gz``, where ``<prefix>`` is
the acquisition's entities (``sub-01_ses-2_run-1``).
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import QSMInputError
from ..phase.files import sidecar_path

INPUT_KINDS = ("bids", "localfield")
#: output role -> file-name suffix after the acquisition's prefix
OUTPUT_SUFFIXES = {"chimap": "_Chimap.nii.gz", "local_field": "_desc-local_fieldmap.nii.gz",
                   "mask": "_desc-qsm_mask.nii.gz"}
_PHASE_FILE = re.compile(r"(?P<prefix>sub-[A-Za-z0-9]+(?:_[a-z]+-[A-Za-z0-9]+)*?)_echo-(?P<echo>\d+)"
                         r"(?P<rest>(?:_[a-z]+-[A-Za-z0-9]+)*?)_part-phase_MEGRE\.nii(?:\.gz)?")
_LABEL = re.compile(r"[A-Za-z0-9]+")


@dataclass(frozen=True)
class Acquisition:
    """One reconstruction to do: its BIDS entities, its input files, and where its outputs go."""

    subject: str                                  #: the label after ``sub-``
    session: Optional[str]                        #: the label after ``ses-``, or None
    prefix: str                                   #: file-name entities, e.g. ``sub-01_ses-2_run-1``
    kind: str                                     #: "bids" (multi-echo phase) or "localfield"
    phase: Tuple[str, ...] = ()                   #: BIDS: the phase echoes, in echo order
    magnitude: Tuple[str, ...] = ()               #: BIDS: the part-mag twins (may be empty: an error later)
    field: Optional[str] = None                   #: localfield: the local field (ppm)
    mask: Optional[str] = None                    #: localfield: its mask
    magnitude_3d: Optional[str] = None            #: localfield: optional magnitude (3D, or 4D echoes)

    @property
    def anat_dir(self) -> Path:
        """The output folder relative to the derivatives root."""
        parts = [f"sub-{self.subject}"] + ([f"ses-{self.session}"] if self.session else []) + ["anat"]
        return Path(*parts)

    def outputs(self, root: Path) -> Dict[str, Path]:
        """Output role -> image path under the derivatives ``root``."""
        return {role: Path(root) / self.anat_dir / (self.prefix + suffix) for role, suffix in OUTPUT_SUFFIXES.items()}

    def input_files(self) -> List[str]:
        """Every file the reconstruction reads: images and, for BIDS, the JSON sidecars that exist."""
        if self.kind == "localfield":
            return [p for p in (self.field, self.mask, self.magnitude_3d) if p]
        files: List[str] = []
        for image in self.phase + self.magnitude:
            files.append(image)
            side = sidecar_path(Path(image))
            if side.is_file():
                files.append(str(side))
        return files


def discover_bids(root: Path, participants: Optional[Sequence[str]] = None) -> List[Acquisition]:
    """Every multi-echo GRE acquisition under a BIDS ``root``, sorted by prefix.

    ``participants`` (labels with or without ``sub-``) keeps only those subjects; a label that matches no
    subject is an error, so a typo does not silently run nothing.
    """
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise QSMInputError(f"the BIDS folder {root} does not exist or is not a folder")
    wanted = _participant_labels(participants)
    groups: Dict[Tuple[Path, str, str], Dict[int, Path]] = {}
    for path in sorted(root.glob("sub-*/**/anat/*_part-phase_MEGRE.nii*")):
        match = _PHASE_FILE.fullmatch(path.name)
        if not match or not _in_subject_tree(path, root):
            continue
        key = (path.parent, match["prefix"], match["rest"])
        echoes = groups.setdefault(key, {})
        echo = int(match["echo"])
        if echo in echoes:  # the same echo as .nii and .nii.gz
            raise QSMInputError(f"echo {echo} of {match['prefix']} is there twice: {echoes[echo].name} and {path.name}")
        echoes[echo] = path
    found = []
    for (folder, prefix, rest), echoes in groups.items():
        entities = dict(part.split("-", 1) for part in (prefix + rest).split("_"))
        if wanted and entities["sub"] not in wanted:
            continue
        phase = tuple(str(echoes[n]) for n in sorted(echoes))
        found.append(Acquisition(subject=entities["sub"], session=entities.get("ses"), prefix=prefix + rest,
                                 kind="bids", phase=phase, magnitude=_magnitude_twins(phase)))
    if wanted:
        missing = sorted(wanted - {a.subject for a in found})
        if missing:
            raise QSMInputError(f"no multi-echo GRE found for participant(s) {', '.join(missing)} under {root}")
    if not found:
        raise QSMInputError(f"no BIDS multi-echo GRE (sub-*/[ses-*/]anat/*_echo-N_part-phase_MEGRE.nii[.gz]) under {root}")
    _check_unique(found)
    return sorted(found, key=lambda a: a.prefix)


def read_manifest(path: Path, participants: Optional[Sequence[str]] = None) -> List[Acquisition]:
    """The acquisitions of a CSV manifest of local fields (see the module docstring), sorted by prefix."""
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise QSMInputError(f"the manifest {path} does not exist (with --input localfield, give a CSV file)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(handle)
            rows = [(reader.line_num, row) for row in reader]
            header = [h.strip() for h in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise QSMInputError(f"cannot read the manifest {path}: {exc}") from exc
    if not rows:
        raise QSMInputError(f"the manifest {path} has no rows (header: subject,field,mask[,session][,magnitude])")
    missing = [c for c in ("subject", "field", "mask") if c not in header]
    if missing:
        raise QSMInputError(f"the manifest {path} lacks the column(s) {', '.join(missing)}"
                            f" (it has {', '.join(header)})")
    unknown = sorted(set(header) - {"subject", "session", "field", "mask", "magnitude"})
    if unknown:
        raise QSMInputError(f"the manifest {path} has unknown column(s) {', '.join(unknown)}")
    wanted = _participant_labels(participants)
    found = []
    for line, row in rows:
        if None in row:  # csv puts the values beyond the header under the key None
            raise QSMInputError(f"{path}:{line}: more values than the header's {len(header)} columns")
        row = {k.strip(): (v or "").strip() for k, v in row.items()}
        subject = _label(row["subject"].removeprefix("sub-"), f"{path}:{line}: subject")
        session = _label(row["session"].removeprefix("ses-"), f"{path}:{line}: session") if row.get("session") else None
        if wanted and subject not in wanted:
            continue
        files = {}
        for column in ("field", "mask", "magnitude"):
            if not row.get(column):
                if column != "magnitude":
                    raise QSMInputError(f"{path}:{line}: no {column} for subject {subject}")
                continue
            file = Path(row[column])
            files[column] = str(file if file.is_absolute() else path.parent / file)
        prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        found.append(Acquisition(subject=subject, session=session, prefix=prefix, kind="localfield",
                                 field=files["field"], mask=files["mask"], magnitude_3d=files.get("magnitude")))
    if wanted:
        absent = sorted(wanted - {a.subject for a in found})
        if absent:
            raise QSMInputError(f"participant(s) {', '.join(absent)} are not in the manifest {path}")
    _check_unique(found)
    return sorted(found, key=lambda a: a.prefix)


def _magnitude_twins(phase: Sequence[str]) -> Tuple[str, ...]:
    """The ``part-mag`` file of each phase echo, ``.nii.gz`` or ``.nii`` (BIDS allows either, whatever the
    phase's), the phase's own extension first; ``()`` unless every echo has one."""
    twins = []
    for image in map(Path, phase):
        stem = image.name.replace("_part-phase_", "_part-mag_").split(".nii")[0]
        extensions = (".nii.gz", ".nii") if image.name.endswith(".gz") else (".nii", ".nii.gz")
        found = [image.with_name(stem + ext) for ext in extensions if image.with_name(stem + ext).is_file()]
        if not found:
            return ()
        twins.append(str(found[0]))
    return tuple(twins)


def _participant_labels(participants: Optional[Sequence[str]]) -> set:
    return {_label(str(p).removeprefix("sub-"), "participant label") for p in participants or ()}


def _label(value: str, what: str) -> str:
    if not _LABEL.fullmatch(value):
        raise QSMInputError(f"{what} {value!r} is not a BIDS label (letters and digits only)")
    return value


def _in_subject_tree(path: Path, root: Path) -> bool:
    """``sub-X/anat/f`` or ``sub-X/ses-Y/anat/f`` whose entities agree with the folders (not derivatives/...)."""
    parts = path.relative_to(root).parts
    if len(parts) == 3:
        return path.name.startswith(parts[0] + "_")
    if len(parts) == 4 and parts[1].startswith("ses-"):
        return path.name.startswith(f"{parts[0]}_{parts[1]}_")
    return False


def _check_unique(found: List[Acquisition]) -> None:
    seen: Dict[str, Acquisition] = {}
    for acq in found:
        if acq.prefix in seen:
            raise QSMInputError(f"{acq.prefix} appears twice: its outputs would overwrite each other")
        seen[acq.prefix] = acq

