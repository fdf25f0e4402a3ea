"""Synthetic whole-body FDG PET phantom: activity (Bq/mL), 511 keV attenuation map and organ labels.

Each subject is a union of analytic shapes (ellipsoids, elliptic cylinders whose cross-section
varies along z) laid out like an adult from the vertex to the upper thighs: head with skull and
brain, neck, torso with a subcutaneous fat layer, lungs, heart (myocardium + blood pool), descending
aorta, liver, spleen, kidneys with renal pelvis, bladder, spine, iliac bones, femurs and legs, plus
2-8 spherical hot lesions (diameter 8-30 mm) in liver, lung, soft tissue, bone marrow or spleen.
Body size (height, lean width, fat thickness from the body weight), organ positions (+-8 mm) and
sizes (+-10 %) and every organ's uptake are drawn per subject from a seeded NumPy generator, so a
seed gives one subject, bit for bit. Shapes are painted on a grid ``supersample`` times finer along
each axis and averaged down, which gives partial-volume edges.

Uptake is drawn uniformly from the SUV range below and converted to Bq/mL with the subject's
injected activity per body weight (3.7 MBq/kg, +-10 % dispensing spread; SUV 1 = 3700 Bq/mL for a
water-density body; SUV as defined in [8]), decay-corrected to injection time as scanners report it.

===============  ==========  ==========  ============================================================
label            SUV range   mu (1/mm)   source / remark
===============  ==========  ==========  ============================================================
0 air            0           0           --
1 muscle         0.7 - 1.0   0.0099      SUV [1,2]; rho 1.05 g/mL [4]
2 fat            0.3 - 0.5   0.0090      SUV [1,2]; rho 0.95 g/mL [4]
3 bone           0.4 - 0.7   0.0170      cortical bone, rho 1.92 g/mL [4]
4 marrow         1.5 - 2.0   0.0110      red marrow/spongiosa, rho 1.18 g/mL [4]; SUV [1,2]
5 brain          6.0 - 9.0   0.0099      grey/white mix; SUVmean 6-9 [1,2]
6 lung           0.4 - 0.6   0.0027      inflated lung rho 0.26-0.30 g/mL [4]; SUV [1,2]
7 myocardium     2.0 - 10.0  0.0100      strongly diet/insulin dependent, 2 to >10 [1,2]
8 blood_pool     1.5 - 2.0   0.0101      mediastinal blood pool [1,5]; rho 1.06 g/mL
9 liver          2.0 - 2.6   0.0101      PERCIST reference organ, SUVmean ~2-2.5 [1,5]
10 spleen        1.6 - 2.2   0.0101      slightly below liver [1,2]
11 kidney        2.5 - 4.5   0.0100      parenchyma [1,2]
12 renal_pelvis  8 - 25      0.0097      excreted FDG in urine (collecting system) [1]
13 bladder       10 - 40     0.0097      urine; highly variable with voiding [1]
14 lesion        3 - 15      0.0100      FDG-avid tumours / nodes, sizes 8-30 mm
===============  ==========  ==========  ============================================================

mu at 511 keV is rho x (mu/rho), with mu/rho ~0.089-0.096 cm2/g for body tissues and water at
0.0096 /mm [3], rounded. Organ sizes and positions follow adult reference anatomy [6] and the XCAT
phantom's layout [7], rounded to the nearest centimetre or so; they are a plausible body for
algorithm development, not a model of any individual.

References:
    [1] Zincirkeser S et al. Standardized uptake values of normal organs on 18F-FDG PET and CT
        imaging. J Int Med Res 2007;35:231-236.
    [2] Ramos CD et al. FDG-PET standardized uptake values in normal anatomical structures using
        iterative reconstruction segmented attenuation correction and filtered back-projection.
        Nucl Med Commun 2001;22:651-656.
    [3] Hubbell JH, Seltzer SM. Tables of X-ray mass attenuation coefficients (NIST XCOM),
        NISTIR 5632, 1995 (values at 511 keV).
    [4] ICRU Report 44: Tissue substitutes in radiation dosimetry and measurement, 1989 (densities).
    [5] Wahl RL et al. From RECIST to PERCIST. J Nucl Med 2009;50 Suppl 1:122S-150S.
    [6] ICRP Publication 89: Basic anatomical and physiological data for use in radiological
        protection: reference values, 2002.
    [7] Segars WP et al. 4D XCAT phantom for multimodality imaging research. Med Phys
        2010;37:4902-4915.
    [8] Boellaard R et al. FDG PET/CT: EANM procedure guidelines for tumour imaging: version 2.0.
        Eur J Nucl Med Mol Imaging 2015;42:328-354 (weight-based FDG activity, SUV definition).

Volume layout: tensors are ``[D, H, W] = [z, y, x]``; index increases towards the patient's
superior (z), anterior (y) and right (x) side, so that the NIfTI array is ``tensor.permute(2, 1, 0)``
with a diagonal, positive RAS+ affine (``nibabel.aff2axcodes`` gives ``('R', 'A', 'S')``) centred
on the volume. Axial slices are ``activity[k]``.

Example:
    >>> p = make_phantom(shape=(64, 40, 40), spacing_mm=(15.0, 12.0, 12.0), seed=1)
    >>> p.activity.shape, p.activity.dtype
    (torch.Size([64, 40, 40]), torch.float32)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lowdose_toolkit.errors import UserError

__all__ = [
    "DOSE_PER_KG_MBQ",
    "LABELS",
    "MU_PER_MM",
    "SUV_RANGES",
    "Phantom",
    "make_phantom",
    "nifti_affine",
]

LABELS: dict[int, str] = {
    0: "air",
    1: "muscle",
    2: "fat",
    3: "bone",
    4: "marrow",
    5: "brain",
    6: "lung",
    7: "myocardium",
    8: "blood_pool",
    9: "liver",
    10: "spleen",
    11: "kidney",
    12: "renal_pelvis",
    13: "bladder",
    14: "lesion",
}
_ID = {name: i for i, name in LABELS.items()}

SUV_RANGES: dict[str, tuple[float, float]] = {
    "air": (0.0, 0.0),
    "muscle": (0.7, 1.0),
    "fat": (0.3, 0.5),
    "bone": (0.4, 0.7),
    "marrow": (1.5, 2.0),
    "brain": (6.0, 9.0),
    "lung": (0.4, 0.6),
    "myocardium": (2.0, 10.0),
    "blood_pool": (1.5, 2.0),
    "liver": (2.0, 2.6),
    "spleen": (1.6, 2.2),
    "kidney": (2.5, 4.5),
    "renal_pelvis": (8.0, 25.0),
    "bladder": (10.0, 40.0),
    "lesion": (3.0, 15.0),
}
"""Uniform SUV range each label's uptake is drawn from (see the module table for sources)."""

MU_PER_MM: dict[str, float] = {
    "air": 0.0,
    "muscle": 0.0099,
    "fat": 0.0090,
    "bone": 0.0170,
    "marrow": 0.0110,
    "brain": 0.0099,
    "lung": 0.0027,
    "myocardium": 0.0100,
    "blood_pool": 0.0101,
    "liver": 0.0101,
    "spleen": 0.0101,
    "kidney": 0.0100,
    "renal_pelvis": 0.0097,
    "bladder": 0.0097,
    "lesion": 0.0100,
}
"""Linear attenuation coefficient at 511 keV per label, 1/mm (water: 0.0096 /mm)."""

DOSE_PER_KG_MBQ = 3.7
"""Injected FDG activity per body weight (MBq/kg): SUV 1 = 3700 Bq/mL at unit density."""
WEIGHT_RANGE_KG = (55.0, 100.0)
LESION_DIAMETERS_MM = (8.0, 12.0, 16.0, 20.0, 30.0)
LESION_HOSTS = ("liver", "lung", "muscle", "marrow", "spleen")


def nifti_affine(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """RAS+ affine of a ``[D, H, W]`` volume written as ``permute(2, 1, 0)``, centred on the origin.

    Args:
        shape: Tensor shape ``(D, H, W)``.
        spacing_mm: Voxel size ``(sz, sy, sx)`` in mm.

    Returns:
        4x4 float64 affine mapping NIfTI voxel indices ``(i, j, k) = (x, y, z)`` to RAS+ mm.
    """
    d, h, w = shape
    sz, sy, sx = spacing_mm
    aff = np.diag([sx, sy, sz, 1.0])
    aff[:3, 3] = [-(w - 1) / 2 * sx, -(h - 1) / 2 * sy, -(d - 1) / 2 * sz]
    return aff


def add_texture(activity: torch.Tensor, sigma: float, fwhm_mm: float, spacing_mm: tuple[float, float, float],
                seed: int | np.random.SeedSequence | np.random.Generator = 0) -> torch.Tensor:
    """``activity`` with heterogeneous uptake: multiplied by ``exp(sigma * G - sigma² / 2)``, ``G`` a smooth
    Gaussian random field of unit variance (white noise blurred to ``fwhm_mm``), so the mean activity is
    kept and a voxel's uptake varies by about ``sigma`` (relative) at that scale, as real organs do."""
    if sigma < 0 or fwhm_mm <= 0:
        raise UserError(f"texture sigma {sigma} must be >= 0 and its FWHM {fwhm_mm} mm > 0")
    if sigma == 0:
        return activity
    from scipy import ndimage

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(activity.shape)),
                                    [fwhm_mm / 2.3548 / s for s in spacing_mm], mode="wrap")
    field /= max(float(field.std()), 1e-12)
    return activity * torch.from_numpy(np.exp(sigma * field - sigma**2 / 2).astype(np.float32))


@dataclass
class Phantom:
    """One synthetic subject.

    Attributes:
        activity: ``[D, H, W]`` float32 activity concentration, Bq/mL (decay-corrected to injection).
        mu: ``[D, H, W]`` float32 linear attenuation coefficient at 511 keV, 1/mm.
        labels: ``[D, H, W]`` uint8 organ label of each voxel (majority of its sub-voxels).
        label_names: Label value -> name (:data:`LABELS`).
        spacing_mm: Voxel size ``(sz, sy, sx)`` in mm.
        affine: RAS+ NIfTI affine for the array ``activity.permute(2, 1, 0)``.
        suv_factor: Multiply Bq/mL by this to get SUV (body weight in g / injected activity in Bq).
        info: Subject facts: weight, injected activity, drawn SUV per organ, lesions.
    """

    activity: torch.Tensor
    mu: torch.Tensor
    labels: torch.Tensor
    label_names: dict[int, str]
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray
    suv_factor: float
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"Phantom(shape={tuple(self.activity.shape)}, spacing_mm={self.spacing_mm}, "
            f"weight_kg={self.info.get('weight_kg')}, lesions={len(self.info.get('lesions', []))})"
        )


# ------------------------------------------------------------------------------------------------
# Body template: lean (muscle) cross-section semi-axes in mm against depth below the vertex (mm)
# ------------------------------------------------------------------------------------------------
_TORSO_D = np.array([290.0, 330.0, 400.0, 520.0, 620.0, 720.0, 800.0, 880.0, 920.0])
_TORSO_A = np.array([175.0, 175.0, 160.0, 150.0, 140.0, 140.0, 150.0, 150.0, 140.0])  # left-right
_TORSO_B = np.array([95.0, 95.0, 100.0, 100.0, 95.0, 95.0, 100.0, 100.0, 95.0])  # antero-posterior


class _Canvas:
    """A fine grid (mm coordinates) on which labels and SUVs are painted shape by shape."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], ss: int):
        self.ss = ss
        self.spacing = spacing
        self.coords = [
            ((np.arange(n * ss, dtype=np.float64) + 0.5) / ss - n / 2) * sp
            for n, sp in zip(shape, spacing, strict=True)
        ]
        fine = tuple(n * ss for n in shape)
        self.labels = np.zeros(fine, np.uint8)
        self.suv = np.zeros(fine, np.float32)
        self.lean = np.zeros(fine, bool)

    def box(self, lo: tuple[float, float, float], hi: tuple[float, float, float]) -> tuple[slice, ...]:
        """Index slices of the fine voxels whose centres lie in the box ``[lo, hi]`` (z, y, x mm)."""
        return tuple(
            slice(int(np.searchsorted(c, a, "left")), int(np.searchsorted(c, b, "right")))
            for c, a, b in zip(self.coords, lo, hi, strict=True)
        )

    def grids(self, sl: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable ``z[:, None, None], y[None, :, None], x[None, None, :]`` of a box."""
        z, y, x = (c[s] for c, s in zip(self.coords, sl, strict=True))
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def ellipsoid(self, c: tuple[float, float, float], r: tuple[float, float, float]):
        """Box and mask of an axis-aligned ellipsoid, centre ``c`` and semi-axes ``r`` (z, y, x)."""
        sl = self.box(tuple(a - b for a, b in zip(c, r, strict=True)), tuple(a + b for a, b in zip(c, r, strict=True)))
        z, y, x = self.grids(sl)
        m = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1.0
        return sl, m

    def paint(self, name: str, suv: float, sl: tuple[slice, ...], mask: np.ndarray, clip: bool = True) -> None:
        """Set label ``name`` and uptake ``suv`` where ``mask`` (inside the lean body if ``clip``)."""
        if mask.size == 0:
            return
        if clip:
            mask = mask & self.lean[sl]
        self.labels[sl][mask] = _ID[name]
        self.suv[sl][mask] = suv


def _draw_subject(rng: np.random.Generator, fov_radius_mm: float) -> dict:
    """Draw the subject's size, fat, organ jitter and uptake."""
    weight = float(rng.uniform(*WEIGHT_RANGE_KG))
    h = float(rng.uniform(0.92, 1.08))
    wl = float(rng.uniform(0.92, 1.08)) * (weight / 75.0) ** 0.15
    al = float(rng.uniform(0.92, 1.08)) * (weight / 75.0) ** 0.15
    fat = float(6.0 + 0.45 * (weight - WEIGHT_RANGE_KG[0]) + rng.uniform(-3.0, 3.0))
    # Shrink laterally if the widest part (shoulders) would not fit well inside the scanner FOV.
    reach = max(_TORSO_A.max() * wl, _TORSO_B.max() * al) + fat
    k = min(1.0, 0.92 * fov_radius_mm / reach)
    suv = {name: float(rng.uniform(*rng_)) for name, rng_ in SUV_RANGES.items()}
    dose_mbq = weight * DOSE_PER_KG_MBQ * float(rng.uniform(0.9, 1.1))
    return {
        "weight_kg": weight,
        "height_scale": h,
        "lean_scale": (al * k, wl * k),
        "fat_mm": fat * k,
        "vertex_margin_mm": float(rng.uniform(10.0, 30.0)),
        "bladder_fill": float(rng.uniform(0.6, 1.2)),
        "suv": suv,
        "injected_mbq": dose_mbq,
    }


def make_phantom(
    shape: tuple[int, int, int] = (160, 80, 80),
    spacing_mm: tuple[float, float, float] = (6.0, 6.0, 6.0),
    seed: int | np.random.SeedSequence | np.random.Generator = 0,
    supersample: int = 2,
) -> Phantom:
    """Draw one whole-body FDG phantom.

    Args:
        shape: Volume shape ``(D, H, W)`` = (axial slices, y, x).
        spacing_mm: Voxel size ``(sz, sy, sx)`` in mm. The body is placed with its vertex 1-3 cm
            below the top slice; an axial extent under ~95 cm cuts it above the thighs.
        seed: Seed, ``SeedSequence`` or ``Generator`` that fixes anatomy, uptake and lesions.
        supersample: Sub-voxels per axis used to paint shapes (partial-volume edges).

    Returns:
        The :class:`Phantom`.

    Raises:
        UserError: If ``shape``, ``spacing_mm`` or ``supersample`` are not positive.

    Example:
        >>> p = make_phantom((64, 40, 40), (15.0, 12.0, 12.0), seed=3)
        >>> float(p.activity.max()) > 0
        True
    """
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing_mm)
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"phantom shape must be three positive integers (D, H, W), got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise UserError(f"phantom spacing_mm must be three positive values (sz, sy, sx), got {spacing}")
    if supersample < 1:
        raise UserError(f"phantom supersample must be >= 1, got {supersample}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    fov_radius = min(shape[1] * spacing[1], shape[2] * spacing[2]) / 2
    s = _draw_subject(rng, fov_radius)
    cv = _Canvas(shape, spacing, supersample)
    _paint_body(cv, s, shape[0] * spacing[0] / 2)
    lesions = _paint_organs(cv, s, rng)

    # Average sub-voxels down: activity and mu with partial volume, labels by majority.
    ss = supersample
    d, h, w = shape

    def down(a: np.ndarray) -> np.ndarray:
        """Mean over ss x ss x ss blocks, reducing one contiguous axis at a time."""
        a = a.reshape(-1, ss).sum(1, dtype=np.float32)
        a = a.reshape(d * ss * h, ss, w).sum(1)
        a = a.reshape(d, ss, h * w).sum(1)
        return (a / np.float32(ss**3)).reshape(d, h, w)

    bq_per_suv = s["injected_mbq"] * 1e6 / (s["weight_kg"] * 1000.0)
    activity = down(cv.suv) * np.float32(bq_per_suv)
    mu_lut = np.array([MU_PER_MM[LABELS[i]] for i in range(len(LABELS))], np.float32)
    mu = down(mu_lut[cv.labels])
    labels = _majority(cv.labels, shape, ss)
    info = {
        "weight_kg": round(s["weight_kg"], 3),
        "injected_mbq": round(s["injected_mbq"], 3),
        "height_scale": round(s["height_scale"], 4),
        "fat_mm": round(s["fat_mm"], 2),
        "suv": {k: round(v, 4) for k, v in s["suv"].items() if k != "lesion"},
        "lesions": lesions,
    }
    return Phantom(
        activity=torch.from_numpy(activity),
        mu=torch.from_numpy(mu),
        labels=torch.from_numpy(labels),
        label_names=dict(LABELS),
        spacing_mm=spacing,
        affine=nifti_affine(shape, spacing),
        suv_factor=s["weight_kg"] * 1000.0 / (s["injected_mbq"] * 1e6),
        info=info,
    )


def _majority(fine: np.ndarray, shape: tuple[int, int, int], ss: int) -> np.ndarray:
    """Most frequent label among each voxel's sub-voxels (ties go to the higher label)."""
    d, h, w = shape
    if ss == 1:
        return fine.copy()
    n = ss**3
    blocks = fine.reshape(d, ss, h, ss, w, ss).transpose(0, 2, 4, 1, 3, 5).reshape(-1, n)
    best = blocks[:, 0].copy()
    mixed = np.flatnonzero(blocks.min(1) != blocks.max(1))  # only edge voxels need a vote
    sub = np.sort(blocks[mixed], axis=1)[:, ::-1]  # descending: argmax picks the higher on ties
    counts = np.stack([(sub == sub[:, j : j + 1]).sum(1, dtype=np.int16) for j in range(n)], 1)
    best[mixed] = np.take_along_axis(sub, counts.argmax(1)[:, None], 1)[:, 0]
    return best.reshape(shape)


def _paint_body(cv: _Canvas, s: dict, z_top: float) -> None:
    """Paint the outline: fat everywhere inside the skin, muscle inside the lean outline."""
    hs = s["height_scale"]
    al, wl = s["lean_scale"]
    fat = s["fat_mm"]
    z_vertex = z_top - s["vertex_margin_mm"]
    y = cv.coords[1][None, :, None].astype(np.float32)
    x = cv.coords[2][None, None, :].astype(np.float32)
    depth = (z_vertex - cv.coords[0]) / hs  # template depth below the vertex of each z, mm

    def section(a: np.ndarray, b: np.ndarray, cy: float, cx: float, pad: float) -> np.ndarray:
        """Elliptic cross-sections with semi-axes a(z), b(z) (template mm, 0 = absent)."""
        out = np.zeros(cv.labels.shape, bool)
        rows = np.flatnonzero((a > 0) & (b > 0))
        if rows.size:
            sl = slice(rows[0], rows[-1] + 1)
            aa = (a[sl] * wl + pad).astype(np.float32)[:, None, None]
            bb = (b[sl] * al + pad).astype(np.float32)[:, None, None]
            inside = ((x - cx * wl) / aa) ** 2 + ((y - cy * al) / bb) ** 2 <= 1.0
            out[sl] = inside & ((a[sl] > 0) & (b[sl] > 0))[:, None, None]
        return out

    def parts(pad_body: float, pad_head: float) -> np.ndarray:
        # Head: ellipsoid, semi-axes LR 76, AP 96, SI 120 mm, centred 120 mm below the vertex.
        q = np.clip(1.0 - ((depth - 120.0) / 120.0) ** 2, 0.0, None) ** 0.5
        m = section(76.0 * q, 96.0 * q, 5.0, 0.0, pad_head)
        # Neck: elliptic cylinder LR 50, AP 55 mm, from 180 to 320 mm.
        neck = ((depth > 180.0) & (depth < 320.0)).astype(np.float64)
        m |= section(50.0 * neck, 55.0 * neck, -10.0, 0.0, pad_body / 2)
        # Torso: interpolated semi-axes, rounded at the shoulders (290-340) and crotch (880-920).
        dd = np.clip(depth, _TORSO_D[0], _TORSO_D[-1])
        cap = np.clip(1.0 - ((340.0 - depth) / 50.0).clip(0.0) ** 2, 0.0, None) ** 0.5
        cap *= np.clip(1.0 - ((depth - 880.0) / 40.0).clip(0.0) ** 2, 0.0, None) ** 0.5
        inside = (depth >= _TORSO_D[0]) & (depth <= _TORSO_D[-1])
        a = np.interp(dd, _TORSO_D, _TORSO_A) * cap * inside
        b = np.interp(dd, _TORSO_D, _TORSO_B) * cap * inside
        m |= section(a, b, 0.0, 0.0, pad_body)
        # Legs: two elliptic cylinders from 840 mm down, LR 62 -> 52, AP 68 -> 58 mm, at x = +-85.
        legs = depth >= 840.0
        taper = np.clip((depth - 840.0) / 360.0, 0.0, 1.0)
        for cx in (-85.0, 85.0):
            m |= section((62.0 - 10.0 * taper) * legs, (68.0 - 10.0 * taper) * legs, 0.0, cx, pad_body)
        return m

    outer = parts(fat, 4.0)
    cv.lean[...] = parts(0.0, 0.0)
    cv.labels[outer] = _ID["fat"]
    cv.suv[outer] = s["suv"]["fat"]
    cv.labels[cv.lean] = _ID["muscle"]
    cv.suv[cv.lean] = s["suv"]["muscle"]


def _paint_organs(cv: _Canvas, s: dict, rng: np.random.Generator) -> list[dict]:
    """Paint organs, bones and lesions over the body; return the lesion list."""
    hs = s["height_scale"]
    al, wl = s["lean_scale"]
    suv = s["suv"]
    z_vertex = cv.coords[0][-1] + cv.spacing[0] / (2 * cv.ss) - s["vertex_margin_mm"]

    def pos(x: float, y: float, depth: float, jitter: bool = True) -> tuple[float, float, float]:
        j = rng.uniform(-8.0, 8.0, 3) if jitter else np.zeros(3)
        return (z_vertex - depth * hs + j[2], y * al + j[1], x * wl + j[0])

    def semi(x: float, y: float, depth: float, scale: float = 1.0) -> tuple[float, float, float]:
        f = float(rng.uniform(0.9, 1.1)) * scale
        return (depth * hs * f, y * al * f, x * wl * f)

    def ell(name: str, value: float, c, r, clip: bool = True) -> None:
        sl, m = cv.ellipsoid(c, r)
        cv.paint(name, value, sl, m, clip)

    # Skull (cortical shell) and brain.
    c_brain = pos(0.0, 5.0, 75.0)
    r_brain = semi(62.0, 78.0, 58.0)
    ell("bone", suv["bone"], c_brain, tuple(v + 7.0 for v in r_brain))
    ell("brain", suv["brain"], c_brain, r_brain)
    # Abdominal organs, then lungs over the liver dome, then the heart over the lungs.
    ell("liver", suv["liver"], pos(55.0, 10.0, 600.0), semi(80.0, 75.0, 75.0))
    ell("spleen", suv["spleen"], pos(-90.0, -30.0, 590.0), semi(30.0, 40.0, 55.0))
    for side, dz in ((1.0, 695.0), (-1.0, 680.0)):  # right kidney sits lower
        c_k = pos(65.0 * side, -45.0, dz)
        ell("kidney", suv["kidney"], c_k, semi(30.0, 30.0, 55.0))
        c_p = (c_k[0], c_k[1] + 5.0 * al, c_k[2] - 15.0 * side * wl)
        ell("renal_pelvis", suv["renal_pelvis"], c_p, semi(10.0, 12.0, 22.0))
    ell("bladder", suv["bladder"], pos(0.0, 30.0, 860.0), semi(45.0, 35.0, 35.0, s["bladder_fill"]))
    ell("lung", suv["lung"], pos(80.0, 0.0, 450.0), semi(55.0, 75.0, 110.0))
    ell("lung", suv["lung"], pos(-80.0, 0.0, 460.0), semi(50.0, 75.0, 105.0))
    c_h = pos(-25.0, 35.0, 500.0)
    r_h = semi(55.0, 45.0, 55.0)
    ell("myocardium", suv["myocardium"], c_h, r_h)
    ell("blood_pool", suv["blood_pool"], c_h, tuple(v * 0.68 for v in r_h))
    _cylinder(cv, "blood_pool", suv["blood_pool"], z_vertex - 780 * hs, z_vertex - 400 * hs,
              lambda z: (-30.0 * al, -25.0 * wl), lambda z: 12.0 * np.ones_like(z))

    # Spine: vertebral bodies (marrow in a cortical ring) following the back, 180-880 mm.
    def spine_centre(z: np.ndarray) -> tuple[np.ndarray, float]:
        depth = (z_vertex - z) / hs
        b = np.where(depth < 320.0, 55.0, np.interp(np.clip(depth, 290, 920), _TORSO_D, _TORSO_B))
        cy = np.where(depth < 320.0, -10.0, 0.0)
        return (cy - 0.6 * b) * al, 0.0

    def spine_radius(z: np.ndarray) -> np.ndarray:
        depth = (z_vertex - z) / hs
        return np.interp(depth, [180.0, 320.0, 880.0], [11.0, 14.0, 20.0])

    z0, z1 = z_vertex - 880.0 * hs, z_vertex - 180.0 * hs
    _cylinder(cv, "bone", suv["bone"], z0, z1, spine_centre, spine_radius)
    _cylinder(cv, "marrow", suv["marrow"], z0, z1, spine_centre, lambda z: spine_radius(z) - 4.0)
    # Iliac wings and femoral heads/shafts.
    for side in (-1.0, 1.0):
        c_il = pos(115.0 * side, -15.0, 770.0, jitter=False)
        r_il = semi(14.0, 55.0, 60.0)
        ell("bone", suv["bone"], c_il, r_il)
        ell("marrow", suv["marrow"], c_il, tuple(max(v - 4.0, 1.0) for v in r_il))
        c_f = pos(85.0 * side, 0.0, 880.0, jitter=False)
        ell("bone", suv["bone"], c_f, (24.0, 24.0, 24.0))
        ell("marrow", suv["marrow"], c_f, (20.0, 20.0, 20.0))
        _cylinder(cv, "bone", suv["bone"], -np.inf, c_f[0], lambda z, cx=c_f[2]: (0.0, cx),
                  lambda z: 14.0 * np.ones_like(z))
    return _paint_lesions(cv, suv, rng)


def _cylinder(
    cv: _Canvas,
    name: str,
    value: float,
    z0: float,
    z1: float,
    centre: Callable[[np.ndarray], tuple],
    radius: Callable[[np.ndarray], np.ndarray],
) -> None:
    """Paint a circular cylinder between heights ``z0 < z1`` whose centre and radius vary with z."""
    zs = cv.coords[0]
    zsl = slice(int(np.searchsorted(zs, z0)), int(np.searchsorted(zs, z1)))
    z = zs[zsl][:, None, None]
    if z.size == 0:
        return
    cy, cx = centre(z)
    r = radius(z)
    y = cv.coords[1][None, :, None]
    x = cv.coords[2][None, None, :]
    m = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    cv.paint(name, value, (zsl, slice(None), slice(None)), m)


def _paint_lesions(cv: _Canvas, suv: dict, rng: np.random.Generator) -> list[dict]:
    """Place 2-8 spherical lesions at random points of randomly chosen host tissues."""
    lesions = []
    for _ in range(int(rng.integers(2, 9))):
        host = str(rng.choice(LESION_HOSTS))
        diameter = float(rng.choice(LESION_DIAMETERS_MM)) * float(rng.uniform(0.9, 1.1))
        value = float(rng.uniform(*SUV_RANGES["lesion"]))
        where = np.flatnonzero(cv.labels == _ID[host])
        if where.size == 0:  # host not in the field of view (short axial extent)
            continue
        idx = np.unravel_index(where[int(rng.integers(where.size))], cv.labels.shape)
        c = tuple(float(cv.coords[a][i]) for a, i in enumerate(idx))
        sl, m = cv.ellipsoid(c, (diameter / 2,) * 3)
        cv.paint("lesion", value, sl, m)
        lesions.append({"host": host, "centre_mm": [round(v, 1) for v in c],
                        "diameter_mm": round(diameter, 2), "suv": round(value, 3)})
    return lesions
