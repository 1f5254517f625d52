"""Synthetic multisequence liver MRI with the radiological signatures of seven lesion classes.

The specification is docs/phantom.md. Each patient is written as
seven image NIfTIs and seven lesion-mask NIfTIs, one per sequence, each on its own grid and
voxel size (T2WI/DWI/ADC: thick slices; T1WI and the three dynamic phases: thinner), with its
own small rigid shift (breathing), plus a manifest row per lesion (fll_jax.data.manifest).

How it is made: the anatomy (body outline, liver, vessels, parenchymal texture, lesions and
their compartments: core, rim/wall, capsule, central scar, peripheral nodules, septa,
perilesional halo) is a set of continuous functions of world millimetres. Each sequence
evaluates them at its own voxel centres (shifted by its breathing offset), at a few offsets
across the slice thickness that are averaged (partial volume), maps compartments to
intensities relative to liver (= 1.0) by the class signature table, then applies the
scanner's gain, smooth bias field, Rician noise and offset. Masks are the lesion regions on
the same grids (voxel value = lesion index 1..n, the manifest's mask_value).

Determinism: the cohort plan comes from `seed`, each patient from its own seed drawn from
it, so the same seed writes the same bytes whatever the number of workers (nibabel writes
.nii.gz with gzip mtime 0).

phantom_truth.json (beside the manifest) records what a model cannot see and saliency
scoring needs: each lesion's centre in every sequence's world space, its compartments, and
which sequences were made atypical and after which class.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import pathlib
import shutil

import numpy as np
from scipy import ndimage

from fll_jax.constants import CLASSES, SEQUENCES
from fll_jax.data.manifest import LesionRecord, write_manifest
from fll_jax.files import read_json, write_json, write_nifti

BACKGROUNDS: tuple[str, ...] = ("normal", "cirrhotic", "fatty")
MANIFEST_NAME = "manifest.csv"
TRUTH_NAME = "phantom_truth.json"
SETTINGS_NAME = "phantom.json"
# Raised whenever the generator writes other images for the same settings, so that a phantom made
# before is not taken for this one.
GENERATOR_VERSION = 1


# ----------------------------------------------------------------------------- scanners

@dataclasses.dataclass(frozen=True)
class Scanner:
    """An MRI scanner profile (the five of the paper's Table 2)."""

    name: str
    field_strength: float
    patients: int  # the paper's patient count: the sampling weight
    gain: float
    offset: float
    noise: float  # Rician sigma as a fraction of the liver signal
    bias: float  # strength of the smooth multiplicative bias field
    t2_voxel_mm: tuple[float, float, float]  # T2WI, DWI, ADC: x, y, slice
    t1_voxel_mm: tuple[float, float, float]  # T1WI, LAP, PVP, DP
    axis_signs: tuple[int, int]  # signs of the x and y voxel axes (vendor/converter convention)


SCANNERS: tuple[Scanner, ...] = (
    Scanner("GE Signa", 1.5, 126, 1.0, 0.0, 0.06, 0.10, (1.48, 1.48, 7.0), (1.37, 1.37, 4.0), (-1, -1)),
    Scanner("GE Discovery MR750w", 3.0, 62, 1.35, 10.0, 0.04, 0.20, (1.41, 1.52, 6.0), (1.25, 1.33, 3.0), (-1, -1)),
    Scanner("Philips Ingenia", 1.5, 58, 0.8, 25.0, 0.055, 0.12, (1.56, 1.56, 7.0), (1.31, 1.31, 3.5), (1, 1)),
    Scanner("Siemens Prisma", 3.0, 50, 1.6, 0.0, 0.035, 0.22, (1.30, 1.30, 6.0), (1.20, 1.20, 3.0), (-1, 1)),
    Scanner("Siemens TrioTim", 3.0, 149, 1.2, 5.0, 0.045, 0.18, (1.60, 1.45, 8.0), (1.40, 1.40, 4.0), (-1, 1)),
)
SCANNER_BY_NAME: dict[str, Scanner] = {s.name: s for s in SCANNERS}

# DWI and ADC come from one acquisition (same grid and shift); every other sequence is its own.
_ACQUISITION = {"t2w": "t2w", "dwi": "dwi", "adc": "dwi", "t1w": "t1w", "lap": "lap", "pvp": "pvp", "dp": "dp"}
_THICK_SLICES = ("t2w", "dwi", "adc")
_MAX_SHIFT_MM = 5.0

# ----------------------------------------------------------------------------- tissues

# Liver signal in scanner units before gain (ADC in 1e-6 mm^2/s); everything else is relative.
LIVER_SIGNAL = {"t2w": 320.0, "dwi": 180.0, "adc": 1100.0, "t1w": 450.0, "lap": 600.0, "pvp": 750.0, "dp": 680.0}
# Fat-suppressed except T2WI; vessels: flow voids on T2WI/DWI, bright on the contrast phases.
FAT = {"t2w": 1.5, "dwi": 0.15, "adc": 0.3, "t1w": 0.35, "lap": 0.35, "pvp": 0.35, "dp": 0.35}
VESSEL = {"t2w": 0.25, "dwi": 0.2, "adc": 2.2, "t1w": 0.6, "lap": 1.8, "pvp": 2.2, "dp": 1.4}
# Parenchyma relative to a normal liver (lesion values stay relative to the normal liver, so a
# fatty liver's low T1 signal changes a lesion's contrast, as it does in patients).
BACKGROUND_FACTOR = {
    "normal": {s: 1.0 for s in SEQUENCES},
    "cirrhotic": {"t2w": 1.05, "dwi": 1.05, "adc": 0.85, "t1w": 0.95, "lap": 0.9, "pvp": 0.9, "dp": 0.95},
    "fatty": {"t2w": 1.08, "dwi": 0.9, "adc": 0.9, "t1w": 0.7, "lap": 0.85, "pvp": 0.85, "dp": 0.85},
}
TEXTURE_AMPLITUDE = {"normal": 0.03, "cirrhotic": 0.07, "fatty": 0.05}
# Regenerative nodules: dark on T2WI, bright on T1WI.
_TEXTURE_SIGN = {"t2w": -1.0, "dwi": 1.0, "adc": -1.0, "t1w": 1.0, "lap": 1.0, "pvp": 1.0, "dp": 1.0}
# Fibrotic septa of a cirrhotic liver: bright on T2WI and delayed phase, dark on T1WI.
FIBROSIS = {"t2w": 0.3, "dwi": 0.1, "adc": 0.0, "t1w": -0.15, "lap": 0.0, "pvp": 0.1, "dp": 0.3}
# P(normal, cirrhotic, fatty) per class: cirrhosis mostly comes with HCC.
BACKGROUND_ODDS = {
    "hcc": (0.3, 0.6, 0.1), "icc": (0.6, 0.25, 0.15),
    **{c: (0.7, 0.1, 0.2) for c in ("cyst", "fnh", "haemangioma", "abscess", "metastasis")},
}

# ----------------------------------------------------------------------------- lesion classes


@dataclasses.dataclass(frozen=True)
class LesionShape:
    """Size and compartment geometry of a lesion class."""

    median_mm: float  # median diameter (paper's Table 2)
    spread: float  # lognormal sigma of the diameter (from the Table 2 IQR or SD)
    multiple: float  # propensity for several lesions in one patient
    lobulation: float  # amplitude of the radial modulation
    frequency: float  # its angular frequency: higher is more irregular
    edge_mm: float  # boundary blur
    rim: float = 1.0  # inner edge of the rim/wall as a fraction of the radius (1: no rim)
    capsule_mm: float = 0.0
    scar: bool = False
    nodules: bool = False
    septa: bool = False
    halo_mm: float = 0.0

    def compartments(self) -> list[str]:
        """The compartments this geometry has (halo lies outside the lesion and its mask)."""
        has = {"core": True, "rim": self.rim < 1, "capsule": self.capsule_mm > 0, "scar": self.scar,
               "nodules": self.nodules, "halo": self.halo_mm > 0}
        return [c for c in COMPARTMENTS if has[c]]


SHAPES: dict[str, LesionShape] = {
    "cyst": LesionShape(12.8, 0.71, 3.0, 0.0, 3.0, 0.4),
    "fnh": LesionShape(31.9, 0.37, 0.3, 0.12, 5.0, 0.6, scar=True),
    "haemangioma": LesionShape(19.7, 0.56, 1.0, 0.08, 4.0, 0.6, rim=0.55, nodules=True),
    "abscess": LesionShape(56.4, 0.47, 0.4, 0.05, 3.0, 0.8, rim=0.72, septa=True, halo_mm=8.0),
    "hcc": LesionShape(28.9, 0.51, 0.8, 0.03, 3.0, 0.5, capsule_mm=1.8),
    "icc": LesionShape(52.45, 0.60, 0.2, 0.18, 7.0, 1.2, rim=0.6),
    "metastasis": LesionShape(28.55, 0.47, 3.0, 0.05, 3.0, 0.7, rim=0.65),
}

# Compartment intensities relative to liver (docs/phantom.md, class signatures). A missing compartment falls
# back: rim -> core, capsule -> rim, scar -> core, nodules -> rim, halo -> liver (1.0).
SIGNATURES: dict[str, dict[str, dict[str, float]]] = {
    "cyst": {"t2w": {"core": 3.0}, "dwi": {"core": 0.6}, "adc": {"core": 3.0}, "t1w": {"core": 0.4},
             "lap": {"core": 0.4}, "pvp": {"core": 0.4}, "dp": {"core": 0.4}},
    "fnh": {"t2w": {"core": 1.1, "scar": 2.0}, "dwi": {"core": 1.1}, "adc": {"core": 1.0},
            "t1w": {"core": 0.9, "scar": 0.6}, "lap": {"core": 2.2, "scar": 0.6},
            "pvp": {"core": 1.05, "scar": 0.9}, "dp": {"core": 1.0, "scar": 1.4}},
    "haemangioma": {"t2w": {"core": 2.5}, "dwi": {"core": 1.2}, "adc": {"core": 1.8}, "t1w": {"core": 0.5},
                    "lap": {"core": 0.5, "nodules": 2.0}, "pvp": {"core": 1.1, "rim": 1.5, "nodules": 1.7},
                    "dp": {"core": 1.3}},
    "abscess": {"t2w": {"core": 2.2, "rim": 1.3}, "dwi": {"core": 2.5, "rim": 1.4},
                "adc": {"core": 0.6, "rim": 1.0}, "t1w": {"core": 0.6, "rim": 0.8},
                "lap": {"core": 0.5, "rim": 1.8, "halo": 1.3}, "pvp": {"core": 0.5, "rim": 1.6, "halo": 1.1},
                "dp": {"core": 0.5, "rim": 1.4}},
    "hcc": {"t2w": {"core": 1.4}, "dwi": {"core": 1.6}, "adc": {"core": 0.8}, "t1w": {"core": 0.8},
            "lap": {"core": 2.0}, "pvp": {"core": 0.8, "capsule": 1.2}, "dp": {"core": 0.7, "capsule": 1.5}},
    "icc": {"t2w": {"core": 1.2, "rim": 1.6}, "dwi": {"core": 1.3, "rim": 1.8}, "adc": {"core": 0.9},
            "t1w": {"core": 0.7}, "lap": {"core": 0.6, "rim": 1.7}, "pvp": {"core": 0.9, "rim": 1.3},
            "dp": {"core": 1.4, "rim": 1.1}},
    "metastasis": {"t2w": {"core": 1.5}, "dwi": {"core": 2.0}, "adc": {"core": 0.8}, "t1w": {"core": 0.7},
                   "lap": {"core": 0.7, "rim": 1.6}, "pvp": {"core": 0.7, "rim": 1.2},
                   "dp": {"core": 0.8, "rim": 0.9}},
}
COMPARTMENTS: tuple[str, ...] = ("core", "rim", "capsule", "scar", "nodules", "halo")
_FALLBACK = {"rim": "core", "capsule": "rim", "scar": "core", "nodules": "rim"}
# The classes each one is commonly confused with (an atypical lesion borrows their pattern).
CONFUSERS: dict[str, tuple[str, ...]] = {
    "cyst": ("haemangioma",), "haemangioma": ("cyst",), "fnh": ("hcc",), "hcc": ("fnh",),
    "abscess": ("metastasis", "icc"), "metastasis": ("abscess", "icc"), "icc": ("metastasis", "abscess"),
}
# Every lesion's values vary around the table's means by this fraction.
VALUE_SPREAD = 0.2
MIN_DIAMETER_MM = 5.0

# ----------------------------------------------------------------------------- scales


@dataclasses.dataclass(frozen=True)
class Scale:
    """Cohort size: lesions per class (CLASSES order), patients, field of view, size cap."""

    lesions: tuple[int, ...]
    patients: int
    fov_mm: tuple[float, float, float]
    max_diameter_mm: float


SCALES: dict[str, Scale] = {
    "quick": Scale((14,) * 7, 75, (120.0, 120.0, 90.0), 44.0),
    "paper": Scale((86, 57, 101, 88, 78, 70, 77), 445, (160.0, 160.0, 110.0), 120.0),
}
TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class PatientSpec:
    """Everything that decides one synthetic patient."""

    patient_id: str
    label: int
    diameters_mm: tuple[float, ...]
    scanner: str
    background: str
    split: str
    fov_mm: tuple[float, float, float]
    seed: int
    atypical_rate: float = 0.1


def _lesions_per_patient(counts: np.ndarray, patients: int, rng: np.random.Generator) -> list[list[int]]:
    """Splits each class's lesions over patients (1-6 each); multiple lesions follow SHAPES.multiple."""
    weight = np.array([SHAPES[c].multiple for c in CLASSES]) * counts
    extra = (counts.sum() - patients) * weight / weight.sum()
    extras = np.floor(extra).astype(int)
    for i in np.argsort(extra - extras)[::-1][: counts.sum() - patients - extras.sum()]:
        extras[i] += 1
    extras = np.minimum(extras, counts - 1)
    if counts.sum() - extras.sum() != patients:
        raise ValueError(f"cannot place {counts.sum()} lesions in {patients} patients")
    groups = []
    for n_lesions, n_extra in zip(counts, extras):
        sizes = np.ones(n_lesions - n_extra, int)
        for _ in range(n_extra):
            sizes[rng.choice(np.flatnonzero(sizes < 6))] += 1
        groups.append(sizes.tolist())
    return groups


def plan_cohort(scale: str | Scale = "quick", seed: int = 0, atypical_rate: float = 0.1) -> list[PatientSpec]:
    """The patients of a phantom cohort, with a class-stratified patient-level 80/20 split."""
    sc = SCALES[scale] if isinstance(scale, str) else scale
    rng = np.random.default_rng(seed)
    counts = np.array(sc.lesions)
    groups = _lesions_per_patient(counts, sc.patients, rng)
    weights = np.array([s.patients for s in SCANNERS], float)
    plans = []
    for label, sizes in enumerate(groups):
        shape = SHAPES[CLASSES[label]]
        order = rng.permutation(len(sizes))
        target, in_test = round(TEST_FRACTION * counts[label]), 0
        split = {}
        for i in order:  # whole patients into test while it stays within ~20 % of the lesions
            first = in_test == 0 and len(sizes) > 1  # every class in test, if it can spare one
            split[i] = "test" if first or in_test + sizes[i] <= target else "dev"
            in_test += sizes[i] if split[i] == "test" else 0
        for i, n in enumerate(sizes):
            d = np.exp(np.log(shape.median_mm) + shape.spread * rng.standard_normal(n))
            d = np.clip(d, MIN_DIAMETER_MM, sc.max_diameter_mm)
            # Widen the field of view for a large lesion (and its crop box) to fit.
            fov = tuple(max(f, 1.5 * float(d.max()) + 24.0) for f in sc.fov_mm)
            plans.append(dict(
                label=label, diameters_mm=tuple(round(float(x), 1) for x in d),
                scanner=SCANNERS[rng.choice(len(SCANNERS), p=weights / weights.sum())].name,
                background=BACKGROUNDS[rng.choice(3, p=BACKGROUND_ODDS[CLASSES[label]])],
                split=split[i], fov_mm=fov, seed=int(rng.integers(2**62)), atypical_rate=atypical_rate))
    order = rng.permutation(len(plans))
    return [PatientSpec(patient_id=f"P{k:04d}", **plans[i]) for k, i in enumerate(order)]


# ----------------------------------------------------------------------------- anatomy


def _slab_mean(a: np.ndarray, nsub: int) -> np.ndarray:
    """Mean over each run of nsub samples along the last axis (the thick-slice average)."""
    # Strided slices: ten times faster than reshape(...).mean(-1) on these shapes.
    return sum(a[..., k::nsub] for k in range(nsub)) * np.float32(1 / nsub)


def _ramp(x):
    """Membership from a signed distance in units of the edge width: 0 -> 1 over one width."""
    return np.clip(x + 0.5, 0.0, 1.0)


class _Field:
    """A volume on a coarse world grid centred on 0, sampled separably by linear interpolation."""

    def __init__(self, values: np.ndarray, spacing_mm: float):
        self.values = values.astype(np.float32)
        self.spacing = spacing_mm
        self.origin = -spacing_mm * (np.array(values.shape) - 1) / 2

    @classmethod
    def noise(cls, rng, extent_mm, spacing_mm, sigma_vox) -> "_Field":
        """Smooth Gaussian noise with unit variance."""
        shape = tuple(int(math.ceil(e / spacing_mm)) + 2 for e in extent_mm)
        v = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
        return cls((v - v.mean()) / v.std(), spacing_mm)

    def sample(self, ax, ay, az):
        """Values at the outer product of the three axis coordinate vectors."""
        v = self.values
        for axis, coords in enumerate((ax, ay, az)):
            t = np.clip((coords - self.origin[axis]) / self.spacing, 0, v.shape[axis] - 1.001)
            i = np.floor(t).astype(int)
            f = (t - i).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
            v = np.take(v, i, axis=axis) * (1 - f) + np.take(v, i + 1, axis=axis) * f
        return v


@dataclasses.dataclass
class _Vessel:
    along: int  # 2: runs cranio-caudally (centreline x(z), y(z)); 0: left-right (y(x), z(x))
    base: np.ndarray  # the centreline's two other coordinates at 0 ...
    slope: np.ndarray  # ... their slopes ...
    curve: np.ndarray  # ... and curvature
    radius: float


class _Anatomy:
    """Body, liver, vessels and texture of one patient, as functions of anatomical mm."""

    def __init__(self, spec: PatientSpec, rng: np.random.Generator):
        fx, fy, fz = spec.fov_mm
        self.background = spec.background
        right = 0.42 * fx - rng.uniform(10, 15)  # the liver's lateral edge, inside the body wall
        left = -0.8 * fx
        self.liver_centre = np.array([(left + right) / 2, rng.uniform(-5, 5), rng.uniform(-5, 5)])
        self.liver_axes = np.array([(right - left) / 2, 0.7 * fy * rng.uniform(0.95, 1.05),
                                    0.65 * fz * rng.uniform(0.95, 1.05)])
        self.body_centre = np.array([-0.25 * fx, rng.uniform(-3, 3)])
        self.body_axes = np.array([0.67 * fx, 0.85 * fy])
        extent = np.array(spec.fov_mm) + 4 * _MAX_SHIFT_MM
        # Low-frequency surface modulation: sums of products of 1-D cosines (cheap on a grid).
        self.waves = [(rng.uniform(2 * np.pi / 150, 2 * np.pi / 60, 3).astype(np.float32),
                       rng.uniform(0, 2 * np.pi, 3).astype(np.float32)) for _ in range(3)]
        self.texture = _Field.noise(rng, extent + 8, 2.0, 1.2)
        self.fibrosis = None
        if spec.background == "cirrhotic":
            # Zero crossings of band-passed noise form a network: the fibrotic septa.
            band = self.texture.values - ndimage.gaussian_filter(self.texture.values, 3.0, mode="wrap")
            self.fibrosis = _Field(np.exp(-(band / (0.35 * band.std())) ** 2), self.texture.spacing)
        self.vessels = [_Vessel(2, np.array([-0.35 * fx, -0.35 * fy]), np.zeros(2), np.zeros(2),
                                rng.uniform(7, 10))]
        for _ in range(rng.integers(2, 4)):  # hepatic veins
            self.vessels.append(_Vessel(
                2, np.array([rng.uniform(-0.3, 0.2) * fx, rng.uniform(-0.2, 0.3) * fy]),
                rng.uniform(-0.4, 0.4, 2), rng.uniform(-2e-3, 2e-3, 2), rng.uniform(2.5, 4.5)))
        for _ in range(rng.integers(1, 3)):  # portal branches
            self.vessels.append(_Vessel(
                0, np.array([rng.uniform(-0.3, 0.3) * fy, rng.uniform(-0.3, 0.3) * fz]),
                rng.uniform(-0.3, 0.3, 2), rng.uniform(-2e-3, 2e-3, 2), rng.uniform(3, 6)))

        # float32 throughout: float64 parameters would promote every grid-sized array.
        for name in ("liver_centre", "liver_axes", "body_centre", "body_axes"):
            setattr(self, name, getattr(self, name).astype(np.float32))
        for v in self.vessels:
            v.base, v.slope, v.curve = (x.astype(np.float32) for x in (v.base, v.slope, v.curve))

    def liver_q(self, points: np.ndarray) -> np.ndarray:
        """Ellipsoid radius (1 on the mean surface) at points [N, 3], without surface texture."""
        return np.sqrt((((points - self.liver_centre) / self.liver_axes) ** 2).sum(-1))

    def fields(self, ax, ay, az) -> dict[str, np.ndarray]:
        """Body, liver and vessel memberships, texture and fibrosis on the grid ax x ay x az."""
        X, Y, Z = ax[:, None, None], ay[None, :, None], az[None, None, :]
        c, a = self.liver_centre, self.liver_axes
        q = np.sqrt(((X - c[0]) / a[0]) ** 2 + ((Y - c[1]) / a[1]) ** 2 + ((Z - c[2]) / a[2]) ** 2)
        texture = self.texture.sample(ax, ay, az)
        for k, (freq, phase) in enumerate(self.waves):
            i, j = k, (k + 1) % 3  # pairs (x, y), (y, z), (z, x)
            ci = np.cos(freq[i] * (X, Y, Z)[i] + phase[i])
            cj = np.cos(freq[j] * (X, Y, Z)[j] + phase[j])
            q = q + np.float32(0.035) * (ci * cj)
        if self.background == "cirrhotic":  # nodular surface
            q = q + 0.03 * texture
        liver = _ramp((1 - q) * (a.min() / 0.8))
        bq = np.sqrt(((X[..., 0] - self.body_centre[0]) / self.body_axes[0]) ** 2
                     + ((Y[..., 0] - self.body_centre[1]) / self.body_axes[1]) ** 2)
        body = _ramp((1 - bq) * (self.body_axes.min() / 1.0))[..., None]
        depth = None  # how far inside the nearest vessel wall, mm
        for v in self.vessels:
            t = (X, Y, Z)[v.along]
            u, w = [(X, Y, Z)[i] for i in range(3) if i != v.along]
            cu = v.base[0] + v.slope[0] * t + v.curve[0] * t ** 2
            cw = v.base[1] + v.slope[1] * t + v.curve[1] * t ** 2
            d = v.radius - np.sqrt((u - cu) ** 2 + (w - cw) ** 2)
            depth = d if depth is None else np.maximum(depth, d)
        out = dict(body=body, liver=liver, vessel=_ramp(depth / 1.5) * liver, texture=texture)
        if self.fibrosis is not None:
            out["fibrosis"] = self.fibrosis.sample(ax, ay, az)
        return out


# ----------------------------------------------------------------------------- lesions


@dataclasses.dataclass
class _Lesion:
    index: int  # the mask value
    label: int
    centre: np.ndarray  # anatomical mm
    radius: float
    axes: np.ndarray  # ellipsoid stretch per axis (product 1)
    lob_dirs: np.ndarray  # [K, 3]
    lob_amp: np.ndarray  # [K]
    lob_phase: np.ndarray  # [K]
    extra_dirs: np.ndarray  # [8, 3]: nodule / scar spoke / septum directions
    values: dict[str, dict[str, float]]  # sequence -> compartment -> relative intensity
    atypical: dict[str, str]  # sequence -> class whose pattern it borrows
    reach: float  # radius of a sphere that holds the lesion (without halo), mm

    @property
    def shape(self) -> LesionShape:
        return SHAPES[CLASSES[self.label]]

    def extent(self) -> np.ndarray:
        """Half-size (mm, per axis) of a box holding the lesion, its halo and blur."""
        s = self.shape
        return self.axes * (self.radius * (1 + np.abs(self.lob_amp).sum()) + s.halo_mm) + 3 * s.edge_mm + 2


def _unit(rng, n):
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _values(cls: str, seq: str, rng: np.random.Generator) -> dict[str, float]:
    """A lesion's own compartment intensities for one sequence, around the class means."""
    table = SIGNATURES[cls][seq]
    out = {}
    for comp in COMPARTMENTS:
        if comp == "halo":
            mean = table.get("halo", 1.0)
            out[comp] = 1 + (mean - 1) * rng.uniform(1 - VALUE_SPREAD, 1 + VALUE_SPREAD)
            continue
        mean = table.get(comp)
        fallback = comp
        while mean is None:
            fallback = _FALLBACK[fallback]
            mean = table.get(fallback)
        out[comp] = mean * rng.uniform(1 - VALUE_SPREAD, 1 + VALUE_SPREAD)
    return out


def _make_lesions(spec: PatientSpec, anatomy: _Anatomy, rng: np.random.Generator) -> list[_Lesion]:
    """Lesions of the patient's class placed inside the liver and the FOV, apart from each other."""
    cls = CLASSES[spec.label]
    shape = SHAPES[cls]
    half_fov = np.array(spec.fov_mm) / 2
    probe = np.concatenate([_unit(rng, 40), np.eye(3), -np.eye(3)])
    order = np.argsort(spec.diameters_mm)[::-1]
    placed = {}
    k = 4  # lobulation terms
    for i in order:
        radius = spec.diameters_mm[i] / 2
        axes = np.exp(rng.normal(0, 0.08, 3))
        axes /= np.prod(axes) ** (1 / 3)
        lob_amp = shape.lobulation * rng.uniform(0.5, 1.0, k) / 2
        centre = None
        while centre is None:
            if radius < MIN_DIAMETER_MM / 2:
                raise ValueError(f"{spec.patient_id}: no room for {len(spec.diameters_mm)} lesions in FOV {spec.fov_mm}")
            reach = radius * axes.max() * (1 + lob_amp.sum())  # bounds the lesion's extent
            box = np.maximum(half_fov - reach - _MAX_SHIFT_MM - 1, 0)
            for attempt in range(300):
                c = rng.uniform(-box, box)
                # First ask for 12 mm of liver all round; then let a large lesion bulge out.
                margin, limit = (reach + 12, 0.92) if attempt < 150 else (0.8 * reach + 8, 0.97)
                if anatomy.liver_q(c + probe * margin).max() > limit:
                    continue
                if all(np.linalg.norm(c - o.centre) > reach + o.reach + 4 for o in placed.values()):
                    centre = c
                    break
            else:
                radius *= 0.9  # no room: shrink rather than change the class counts
        atypical = {}
        if rng.random() < spec.atypical_rate:
            confuser = CONFUSERS[cls][rng.integers(len(CONFUSERS[cls]))]
            for s in rng.choice(SEQUENCES, rng.integers(1, 3), replace=False):
                atypical[str(s)] = confuser
        values = {s: _values(atypical.get(s, cls), s, rng) for s in SEQUENCES}
        placed[i] = _Lesion(
            index=int(i) + 1, label=spec.label, centre=centre.astype(np.float32), radius=float(radius),
            axes=axes.astype(np.float32), lob_dirs=_unit(rng, k).astype(np.float32),
            lob_amp=lob_amp.astype(np.float32),
            lob_phase=rng.uniform(0, 2 * np.pi, k).astype(np.float32), extra_dirs=_unit(rng, 8).astype(np.float32),
            values=values, atypical=atypical, reach=float(reach))
    return [placed[i] for i in range(len(spec.diameters_mm))]


def _lesion_fields(les: _Lesion, ax, ay, az, nsub: int, texture: np.ndarray):
    """Compartment memberships of one lesion inside its bounding box.

    Returns (box slices on the sub-sampled grid, voxel z slice, dict of memberships, mask
    fraction per voxel).
    """
    s = les.shape
    ext = les.extent()
    sl = []
    for axis, coords in enumerate((ax, ay)):
        idx = np.flatnonzero(np.abs(coords - les.centre[axis]) <= ext[axis])
        sl.append(slice(idx.min(), idx.max() + 1))
    zvox = az.reshape(-1, nsub).mean(1)
    thick = (az[nsub - 1] - az[0]) if nsub > 1 else 0.0
    kz = np.flatnonzero(np.abs(zvox - les.centre[2]) <= ext[2] + thick)
    zs = slice(kz.min(), kz.max() + 1)
    sl.append(slice(zs.start * nsub, zs.stop * nsub))
    R = les.radius
    dx = ((ax[sl[0]] - les.centre[0]) / les.axes[0])[:, None, None]
    dy = ((ay[sl[1]] - les.centre[1]) / les.axes[1])[None, :, None]
    dz = ((az[sl[2]] - les.centre[2]) / les.axes[2])[None, None, :]
    r = np.sqrt(dx ** 2 + dy ** 2 + dz ** 2) + 1e-3
    lob = 1.0
    for v, amp, phase in zip(les.lob_dirs, les.lob_amp, les.lob_phase):
        if amp:
            lob = lob + amp * np.cos(s.frequency * (dx * v[0] + dy * v[1] + dz * v[2]) / r + phase)
    rho = r / (R * lob)
    m = {"lesion": _ramp((1 - rho) * (R / s.edge_mm)), "texture": texture[tuple(sl)]}
    if s.rim < 1:
        m["rim"] = _ramp((rho - s.rim) * (R / 1.0))
    if s.septa:  # two thin walls across the cavity
        sep = 0
        for n in les.extra_dirs[:2]:
            sep = np.maximum(sep, _ramp((0.8 - np.abs(dx * n[0] + dy * n[1] + dz * n[2])) / 0.6))
        m["septa"] = sep * (1 - m["rim"])
    if s.capsule_mm:
        m["capsule"] = _ramp((rho - (1 - s.capsule_mm / R)) * (R / 0.5))
    if s.scar:  # a central stellate scar: a small core and four spokes
        scar = _ramp((0.18 - rho) * (R / 0.8))
        for v in les.extra_dirs[:4]:
            proj = dx * v[0] + dy * v[1] + dz * v[2]
            perp = np.sqrt(np.maximum(r ** 2 - proj ** 2, 0))
            spoke = _ramp((1.5 - perp) / 1.0) * _ramp(proj) * _ramp((0.7 - rho) * (R / 1.5))
            scar = np.maximum(scar, spoke)
        m["scar"] = scar
    if s.nodules:  # discontinuous peripheral nodules
        nod = 0
        for v in les.extra_dirs:
            d = np.sqrt((dx - 0.75 * R * v[0]) ** 2 + (dy - 0.75 * R * v[1]) ** 2 + (dz - 0.75 * R * v[2]) ** 2)
            nod = np.maximum(nod, _ramp((max(0.25 * R, 3.0) - d) / 0.8))
        m["nodules"] = nod
    if s.halo_mm:
        m["halo"] = _ramp((1 + s.halo_mm / R - rho) * (R / 2.0))
    inside = _slab_mean((rho < 1).astype(np.float32), nsub)
    return tuple(sl), zs, m, inside


def _lesion_intensity(m: dict[str, np.ndarray], values: dict[str, float]) -> np.ndarray:
    """Relative intensity inside the lesion: core, then each compartment laid over it."""
    v = values["core"] * np.ones_like(m["lesion"])
    for comp, value_key in (("rim", "rim"), ("septa", "rim"), ("capsule", "capsule"),
                            ("scar", "scar"), ("nodules", "nodules")):
        if comp in m:
            v = v + (values[value_key] - v) * m[comp]
    return v * (1 + 0.04 * m["texture"])


# ----------------------------------------------------------------------------- rendering


def _grid(fov_mm, voxel_mm, signs) -> tuple[np.ndarray, tuple[int, int, int], list[np.ndarray]]:
    """Affine, shape and per-axis world coordinates of a grid centred on the FOV."""
    shape = tuple(int(math.ceil(f / v)) for f, v in zip(fov_mm, voxel_mm))
    steps = np.array([signs[0] * voxel_mm[0], signs[1] * voxel_mm[1], voxel_mm[2]])
    origin = -steps * (np.array(shape) - 1) / 2
    affine = np.diag(np.append(steps, 1.0))
    affine[:3, 3] = origin
    coords = [origin[i] + steps[i] * np.arange(shape[i]) for i in range(3)]
    return affine, shape, coords


def _bias(coords, fov_mm, coeffs, strength) -> np.ndarray:
    """Smooth multiplicative field (receive-coil sensitivity) in scanner coordinates."""
    x, y, z = [(c / (f / 2)).astype(np.float32) for c, f in zip(coords, fov_mm)]
    X, Y, Z = x[:, None, None], y[None, :, None], z[None, None, :]
    p = coeffs[0] * X + coeffs[1] * Y + coeffs[2] * Z + coeffs[3] * X * Y + coeffs[4] * X ** 2 + coeffs[5] * Y ** 2
    return np.exp(strength * p)


def _relative_intensity(s: str, bg: str, f: dict, lesions: list[_Lesion], boxes: list) -> np.ndarray:
    """Sequence s's intensity relative to a normal liver, on the sub-sampled grid."""
    liver_value = BACKGROUND_FACTOR[bg][s] * (1 + TEXTURE_AMPLITUDE[bg] * _TEXTURE_SIGN[s] * f["texture"])
    if "fibrosis" in f:
        liver_value = liver_value + FIBROSIS[s] * f["fibrosis"]
    inner = liver_value * (1 - f["vessel"]) + VESSEL[s] * f["vessel"]
    rel = f["body"] * (FAT[s] * (1 - f["liver"]) + f["liver"] * inner)
    for les, (sl, _, m, _) in zip(lesions, boxes):
        box = rel[sl]
        if "halo" in m:
            box = box * (1 + (les.values[s]["halo"] - 1) * m["halo"])
        rel[sl] = box * (1 - m["lesion"]) + m["lesion"] * _lesion_intensity(m, les.values[s])
    return rel


def _acquire(rel: np.ndarray, s: str, scanner: Scanner, gain: float, bias: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
    """Scanner units (int16): gain, coil bias, Rician magnitude noise and offset."""
    if s == "adc":  # a computed map: no coil bias, Gaussian error, no offset
        sigma = 1.5 * scanner.noise * LIVER_SIGNAL[s]
        image = rel * LIVER_SIGNAL[s] + sigma * rng.standard_normal(rel.shape, dtype=np.float32)
    else:
        signal = rel * (LIVER_SIGNAL[s] * gain) * bias
        sigma = scanner.noise * LIVER_SIGNAL[s] * gain * (2.0 if s == "dwi" else 1.0)
        n1 = rng.standard_normal(rel.shape, dtype=np.float32)
        n2 = rng.standard_normal(rel.shape, dtype=np.float32)
        image = np.sqrt((signal + sigma * n1) ** 2 + (sigma * n2) ** 2) + scanner.offset
    return np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)


def generate_patient(spec: PatientSpec, out_dir: str | pathlib.Path) -> tuple[list[LesionRecord], list[dict]]:
    """Writes one patient's 14 NIfTI files under out_dir/patients/<patient_id>/.

    Returns:
      The patient's manifest records (absolute paths) and one ground-truth dict per lesion
      (lesion_id, label, diameter_mm, planned_diameter_mm, centre_mm per sequence in that
      sequence's world space, compartments, values: sequence -> compartment -> intensity
      relative to a normal liver, atypical: sequence -> class whose pattern it borrows).
    """
    rng = np.random.default_rng(spec.seed)
    scanner = SCANNER_BY_NAME[spec.scanner]
    folder = pathlib.Path(out_dir).resolve() / "patients" / spec.patient_id
    folder.mkdir(parents=True, exist_ok=True)
    anatomy = _Anatomy(spec, rng)
    lesions = _make_lesions(spec, anatomy, rng)
    shifts = {}
    for acq in dict.fromkeys(_ACQUISITION.values()):
        t = np.array([rng.uniform(-2, 2), rng.uniform(-2, 2), rng.uniform(-_MAX_SHIFT_MM, _MAX_SHIFT_MM)])
        shifts[acq] = t * min(1.0, _MAX_SHIFT_MM / np.linalg.norm(t))
    gain = scanner.gain * rng.uniform(0.9, 1.1)  # coil loading and prescan vary by patient
    bias_coeffs = rng.normal(0, 0.5, 6)
    noise_seeds = {s: int(rng.integers(2**62)) for s in SEQUENCES}
    bg = spec.background

    for acq in dict.fromkeys(_ACQUISITION.values()):
        seqs = [s for s in SEQUENCES if _ACQUISITION[s] == acq]
        voxel = scanner.t2_voxel_mm if acq in _THICK_SLICES else scanner.t1_voxel_mm
        affine, shape, coords = _grid(spec.fov_mm, voxel, scanner.axis_signs)
        nsub = max(1, math.ceil(voxel[2] / 2.0))
        offsets = voxel[2] * ((np.arange(nsub) + 0.5) / nsub - 0.5)
        t = shifts[acq]
        # Anatomy seen by this acquisition: world coordinates minus its breathing shift.
        ax, ay = (coords[0] - t[0]).astype(np.float32), (coords[1] - t[1]).astype(np.float32)
        az = ((coords[2][:, None] + offsets[None, :]).ravel() - t[2]).astype(np.float32)
        f = anatomy.fields(ax, ay, az)
        boxes = [_lesion_fields(les, ax, ay, az, nsub, f["texture"]) for les in lesions]
        mask = np.zeros(shape, np.uint8)
        for les, (sl, zs, _, inside) in zip(lesions, boxes):
            region = inside >= 0.5
            if not region.any():  # a lesion thinner than a slice still marks its best voxel
                region = inside == inside.max()
            mask[sl[0], sl[1], zs][region] = les.index
        bias = _bias(coords, spec.fov_mm, bias_coeffs, scanner.bias)
        for s in seqs:
            rel = _slab_mean(_relative_intensity(s, bg, f, lesions, boxes), nsub)
            image = _acquire(rel, s, scanner, gain, bias, np.random.default_rng(noise_seeds[s]))
            write_nifti(image, affine, folder / f"{s}.nii.gz")
            write_nifti(mask, affine, folder / f"{s}_mask.nii.gz")

    records, truth = [], []
    for les, d in zip(lesions, spec.diameters_mm):
        lesion_id = f"{spec.patient_id}_L{les.index}"
        records.append(LesionRecord(
            patient_id=spec.patient_id, lesion_id=lesion_id, label=spec.label, mask_value=les.index,
            images={s: folder / f"{s}.nii.gz" for s in SEQUENCES},
            masks={s: folder / f"{s}_mask.nii.gz" for s in SEQUENCES},
            scanner=scanner.name, field_strength=scanner.field_strength, background=bg,
            diameter_mm=round(2 * les.radius, 1), split=spec.split))
        truth.append(dict(
            lesion_id=lesion_id, label=CLASSES[spec.label], diameter_mm=round(2 * les.radius, 1),
            planned_diameter_mm=d,
            centre_mm={s: [round(float(x), 3) for x in les.centre + shifts[_ACQUISITION[s]]] for s in SEQUENCES},
            compartments=les.shape.compartments(),
            values={s: {c: round(v, 3) for c, v in les.values[s].items()} for s in SEQUENCES},
            atypical=les.atypical))
    return records, truth


def phantom_settings(scale: str | Scale = "quick", seed: int = 0, atypical_rate: float = 0.1) -> dict:
    """What a phantom's bytes depend on (phantom.json): generator version, scale values, seed, atypical rate."""
    sc = SCALES[scale] if isinstance(scale, str) else scale
    settings = {"generator_version": GENERATOR_VERSION, "scale": dataclasses.asdict(sc), "seed": seed,
                "atypical_rate": atypical_rate}
    return json.loads(json.dumps(settings))  # tuples as lists, as read back


def phantom_differences(out_dir: str | pathlib.Path, scale: str | Scale = "quick", seed: int = 0,
                        atypical_rate: float = 0.1) -> list[str]:
    """How the phantom in out_dir differs from the one these settings make ([]: it is that one)."""
    path = pathlib.Path(out_dir) / SETTINGS_NAME
    if not path.exists():
        return [f"no {SETTINGS_NAME}: made by a generator older than version {GENERATOR_VERSION}, or not a phantom"]
    stored = read_json(path, "delete the phantom's folder to have it made again")
    wanted = phantom_settings(scale, seed, atypical_rate)
    return [f"{key}: {stored.get(key)!r}, wanted {value!r}"
            for key, value in wanted.items() if stored.get(key) != value]


def generate_phantom(out_dir: str | pathlib.Path, scale: str | Scale = "quick", seed: int = 0,
                     atypical_rate: float = 0.1, workers: int = 2, overwrite: bool = False) -> pathlib.Path:
    """Writes a phantom cohort: patients/<id>/<seq>[_mask].nii.gz, manifest.csv, phantom_truth.json
    and phantom.json (its settings).

    Args:
      out_dir: output folder.
      scale: "quick", "paper" or a Scale.
      seed: the same seed writes the same bytes.
      atypical_rate: fraction of lesions with one or two sequences borrowed from a confuser class.
      workers: processes generating patients in parallel.
      overwrite: replace an existing phantom in out_dir (its patients/ folder is deleted).

    Returns:
      The manifest's path.
    """
    out_dir = pathlib.Path(out_dir)
    manifest = out_dir / MANIFEST_NAME
    if manifest.exists():
        if not overwrite:
            raise FileExistsError(f"{manifest} already exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out_dir / "patients", ignore_errors=True)
        manifest.unlink()
    specs = plan_cohort(scale, seed, atypical_rate)
    jobs = [(spec, out_dir) for spec in specs]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.starmap(generate_patient, jobs, chunksize=1)
    else:
        results = [generate_patient(*job) for job in jobs]
    records = [r for rs, _ in results for r in rs]
    truth = [t for _, ts in results for t in ts]
    write_json(out_dir / TRUTH_NAME, truth)
    write_json(out_dir / SETTINGS_NAME, phantom_settings(scale, seed, atypical_rate))
    # Written last: a manifest means a complete phantom.
    write_manifest(records, manifest)
    return manifest
