"""Paint the pixels of a synthetic CT series: recognisable anatomy, quickly and reproducibly.

:mod:`p2pshare.dicom.synthetic` builds the headers and writes the files; this module only draws
what a viewer shows, slice by slice, for a body region (head, chest or abdomen) whose anatomy
varies a little with the seed. Anatomical accuracy matters less than two other things:

* **Speed.** A 600-slice, ~300 MB study must be produced in seconds, so every slice is painted
  as a small label image (one byte per pixel) using ellipses evaluated only inside their bounding
  boxes, mapped to Hounsfield units through a lookup table, and given pre-generated, spatially
  correlated noise taken as a shifted window into a noise bank.
* **Determinism.** All randomness comes from the generator the caller passes in, so the same
  seed gives the same pixels and the files stay byte-identical across runs.

Stored values are ``HU + 1024`` in 12 bits (:data:`INTERCEPT` -1024, slope 1), the usual CT
convention, with pixels outside the circular reconstruction field (:data:`FOV`) set to -1024 HU.
The header must declare the same intercept and field of view, so both are defined here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from p2pshare.dicom.synthetic import SeriesSpec

__all__ = ["FOV", "INTERCEPT", "Painter"]

#: Reconstruction field of view (mm) per region.
FOV = {"head": 240.0, "chest": 450.0, "abdomen": 450.0}
#: Quantum noise standard deviation (HU); thin head slices are reconstructed smoother.
_NOISE_HU = {"head": 5.0, "chest": 14.0, "abdomen": 11.0}

# Tissue labels and their Hounsfield units. The label image is one byte per pixel.
AIR, FAT, SOFT, LUNG, CORTEX, MARROW, CSF, GREY, WHITE = range(9)
LIVER, SPLEEN, KIDNEY, VESSEL, BLOOD, GAS, FLUID, BOWEL, TABLE, DISC = range(9, 19)
_HU = {
    AIR: -1000.0,
    FAT: -100.0,
    SOFT: 40.0,
    LUNG: -850.0,
    CORTEX: 1000.0,
    MARROW: 320.0,
    CSF: 8.0,
    GREY: 38.0,
    WHITE: 27.0,
    LIVER: 95.0,
    SPLEEN: 105.0,
    KIDNEY: 150.0,
    VESSEL: 190.0,
    BLOOD: 160.0,
    GAS: -950.0,
    FLUID: 10.0,
    BOWEL: 30.0,
    TABLE: -250.0,
    DISC: 85.0,
}
INTERCEPT = -1024.0
_MAX_STORED = 4095.0  # BitsStored 12

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.uint8]


def _smooth(u: float, lo: float, hi: float) -> float:
    """0 below ``lo``, 1 above ``hi``, a smooth step in between."""
    if hi <= lo:
        return 1.0 if u >= hi else 0.0
    t = min(1.0, max(0.0, (u - lo) / (hi - lo)))
    return t * t * (3 - 2 * t)


def _bump(u: float, lo: float, hi: float) -> float:
    """A smooth hump that is 0 outside [lo, hi] and 1 at its centre."""
    if not lo < u < hi:
        return 0.0
    return math.sin(math.pi * (u - lo) / (hi - lo))


class Painter:
    """Draws the slices of one series. Buffers and noise are allocated once per series."""

    def __init__(self, spec: SeriesSpec, rng: np.random.Generator) -> None:
        self.region = spec.region
        self.rows, self.columns = spec.rows, spec.columns
        fov = FOV[spec.region]
        self.spacing = fov / max(spec.rows, spec.columns)
        # Patient coordinates of pixel centres (mm): x to the patient's left, y posterior.
        self.x = ((np.arange(spec.columns) - (spec.columns - 1) / 2) * self.spacing).astype(
            np.float32
        )
        self.y = ((np.arange(spec.rows) - (spec.rows - 1) / 2) * self.spacing).astype(np.float32)
        radius2 = self.x[None, :] ** 2 + self.y[:, None] ** 2
        self.outside_fov = radius2 > (fov / 2) ** 2
        self.labels: LabelArray = np.zeros((spec.rows, spec.columns), dtype=np.uint8)
        self.values: FloatArray = np.zeros((spec.rows, spec.columns), dtype=np.float32)
        lut = np.full(256, _HU[AIR] - INTERCEPT, dtype=np.float32)
        for label, hu in _HU.items():
            lut[label] = hu - INTERCEPT
        self.lut = lut
        self.rng = rng
        self.pad = 32
        self.noise = [self._noise_bank(_NOISE_HU[spec.region]) for _ in range(2)]
        # Anatomy that varies per patient (seed) but stays fixed within the series.
        self.body_scale = float(rng.uniform(0.92, 1.08))
        self.loops = rng.uniform(0.0, 1.0, size=(14, 5)).astype(np.float64)
        self.draw: Callable[[float, float], None] = {
            "head": self._head,
            "chest": self._chest,
            "abdomen": self._abdomen,
        }[spec.region]

    def _noise_bank(self, sigma: float) -> FloatArray:
        """Unit white noise blurred over 2x2 pixels (CT noise is spatially correlated)."""
        shape = (self.rows + self.pad + 1, self.columns + self.pad + 1)
        white = self.rng.standard_normal(shape, dtype=np.float32)
        blurred = white[:-1, :-1] + white[1:, :-1] + white[:-1, 1:] + white[1:, 1:]
        blurred *= np.float32(sigma / 2.0)
        return blurred

    def slice(self, u: float, z: float) -> npt.NDArray[np.uint16]:
        """Stored pixel values of the slice at fraction ``u`` of the region, table position z."""
        self.labels.fill(AIR)
        self.draw(u, z)
        np.take(self.lut, self.labels, out=self.values)
        bank = self.noise[int(self.rng.integers(0, len(self.noise)))]
        dy, dx = (int(v) for v in self.rng.integers(0, self.pad + 1, size=2))
        self.values += bank[dy : dy + self.rows, dx : dx + self.columns]
        np.copyto(self.values, 0.0, where=self.outside_fov)
        np.clip(self.values, 0.0, _MAX_STORED, out=self.values)
        return self.values.astype(np.uint16)

    # -- primitives

    def ellipse(
        self,
        cx: float,
        cy: float,
        ax: float,
        ay: float,
        label: int,
        angle: float = 0.0,
        within: int | None = None,
    ) -> None:
        """Paint an ellipse (centre and semi-axes in mm, rotated by ``angle`` radians).

        Only the ellipse's bounding box is evaluated. With ``within``, only pixels currently
        holding that label are painted (e.g. bowel gas only inside bowel).
        """
        if ax <= 0 or ay <= 0:
            return
        reach = max(ax, ay) if angle else 0.0
        rx, ry = (reach, reach) if angle else (ax, ay)
        c0, c1 = np.searchsorted(self.x, [cx - rx, cx + rx])
        r0, r1 = np.searchsorted(self.y, [cy - ry, cy + ry])
        if c1 <= c0 or r1 <= r0:
            return
        dx = self.x[c0:c1] - np.float32(cx)
        dy = self.y[r0:r1] - np.float32(cy)
        if angle:
            cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
            u = dx[None, :] * cos + dy[:, None] * sin
            v = dy[:, None] * cos - dx[None, :] * sin
            inside = (u / np.float32(ax)) ** 2 + (v / np.float32(ay)) ** 2 <= 1.0
        else:
            inside = (dx[None, :] / np.float32(ax)) ** 2 + (dy[:, None] / np.float32(ay)) ** 2
            inside = inside <= 1.0
        box = self.labels[r0:r1, c0:c1]
        if within is not None:
            inside &= box == within
        np.copyto(box, np.uint8(label), where=inside)

    def rect(self, x0: float, x1: float, y0: float, y1: float, label: int) -> None:
        c0, c1 = np.searchsorted(self.x, [x0, x1])
        r0, r1 = np.searchsorted(self.y, [y0, y1])
        self.labels[r0:r1, c0:c1] = label

    def body(self, ax: float, ay: float, cy: float, fat: float) -> None:
        """Skin-to-muscle: a fat shell around soft tissue, and the table underneath."""
        self.rect(-215.0, 215.0, cy + ay + 6.0, cy + ay + 16.0, TABLE)
        self.ellipse(0.0, cy, ax, ay, FAT)
        self.ellipse(0.0, cy, ax - fat, ay - fat, SOFT)

    def vertebra(self, cy: float, radius: float, z: float, canal: bool = True) -> None:
        """A vertebral body (cortex around marrow) or, between vertebrae, a disc."""
        in_disc = math.sin(2 * math.pi * z / 28.0) > 0.78
        if in_disc:
            self.ellipse(0.0, cy, radius, radius * 0.8, DISC)
        else:
            self.ellipse(0.0, cy, radius, radius * 0.8, CORTEX)
            self.ellipse(0.0, cy, radius - 2.5, radius * 0.8 - 2.5, MARROW)
        # Posterior arch and spinous process, then the canal with its CSF.
        self.ellipse(0.0, cy + radius * 1.45, radius * 0.75, radius * 0.55, CORTEX)
        self.ellipse(0.0, cy + radius * 2.2, 4.0, radius * 0.6, CORTEX)
        if canal:
            self.ellipse(0.0, cy + radius * 1.35, radius * 0.42, radius * 0.38, CSF)

    # -- regions

    def _head(self, u: float, z: float) -> None:
        # u=0 at the vertex, u=1 at the skull base; the head widens then narrows slightly.
        g = 0.35 + 0.65 * math.sin(0.5 * math.pi * min(u / 0.6, 1.0)) - 0.08 * _smooth(u, 0.8, 1.0)
        g *= self.body_scale
        ax, ay, cy = 74.0 * g, 92.0 * g, 4.0
        self.rect(-110.0, 110.0, cy + ay + 10.0, cy + ay + 20.0, TABLE)
        self.ellipse(0.0, cy, ax, ay, SOFT)  # scalp
        self.ellipse(0.0, cy, ax - 4.0, ay - 4.0, CORTEX)  # outer table
        self.ellipse(0.0, cy, ax - 5.5, ay - 5.5, MARROW)  # diploe
        self.ellipse(0.0, cy, ax - 7.5, ay - 7.5, CORTEX)  # inner table
        self.ellipse(0.0, cy, ax - 9.0, ay - 9.0, CSF)
        self.ellipse(0.0, cy, ax - 10.5, ay - 10.5, GREY)
        white = _bump(u, 0.08, 0.85)
        self.ellipse(0.0, cy, (ax - 22.0) * white, (ay - 24.0) * white, WHITE)
        vent = _bump(u, 0.3, 0.65)
        if vent > 0:
            for side in (-1.0, 1.0):
                self.ellipse(side * 9.0, cy - 6.0, 4.5 * vent, 24.0 * vent, CSF, side * 0.25)
            self.ellipse(0.0, cy + 2.0, 1.5, 10.0 * vent, CSF)  # third ventricle
        # Falx between the hemispheres.
        if u < 0.75:
            self.rect(-0.8, 0.8, cy - ay + 12.0, cy + ay - 12.0, CSF)
        base = _smooth(u, 0.72, 0.95)
        if base > 0:
            # Orbits (fat around the globe), petrous bones, then sinuses and the nasal cavity.
            for side in (-1.0, 1.0):
                self.ellipse(side * 30.0, cy - ay + 22.0, 17.0 * base, 19.0 * base, FAT)
                self.ellipse(side * 30.0, cy - ay + 20.0, 11.5 * base, 11.5 * base, SOFT)
                self.ellipse(side * 38.0, cy + 20.0, 26.0 * base, 8.0 * base, CORTEX, side * 0.6)
            sinus = _smooth(u, 0.86, 1.0)
            if sinus > 0:
                for side in (-1.0, 1.0):
                    self.ellipse(side * 22.0, cy - ay + 40.0, 14.0 * sinus, 16.0 * sinus, AIR)
                self.ellipse(0.0, cy - ay + 30.0, 5.0 * sinus, 20.0 * sinus, AIR)

    def _chest(self, u: float, z: float) -> None:
        # u=0 at the lung apices, u=1 at the domes of the diaphragm.
        s = self.body_scale
        ax = s * (150.0 + 30.0 * (1.0 - _smooth(u, 0.0, 0.25)) + 8.0 * _bump(u, 0.2, 1.4))
        ay = s * (100.0 + 12.0 * _smooth(u, 0.0, 0.8))
        cy = 5.0
        fat = 11.0 * s
        self.body(ax, ay, cy, fat)
        # Lungs: small at the apex, largest mid-chest, pushed up by liver and spleen at the base.
        size = 0.45 + 0.55 * math.sin(0.5 * math.pi * min(u / 0.55, 1.0))
        size *= 1.0 - 0.35 * _smooth(u, 0.75, 1.0)
        for side in (-1.0, 1.0):
            self.ellipse(side * 0.47 * ax, cy - 4.0, 0.36 * ax * size, 0.74 * ay * size, LUNG)
        # Heart in the lower mediastinum, a little to the patient's left.
        heart = _bump(u, 0.4, 1.15)
        if heart > 0:
            self.ellipse(22.0, cy - 22.0, 58.0 * heart, 45.0 * heart, SOFT, 0.5)
            self.ellipse(24.0, cy - 24.0, 44.0 * heart, 33.0 * heart, BLOOD, 0.5)
        # Airway down to the carina, great vessels, descending aorta.
        if u < 0.38:
            self.ellipse(0.0, cy - 12.0, 9.0, 8.0, AIR)
        elif u < 0.48:
            for side in (-1.0, 1.0):
                self.ellipse(side * 16.0, cy - 8.0, 6.0, 5.5, AIR)
        if 0.22 < u < 0.55:
            self.ellipse(-8.0, cy - 32.0, 15.0, 15.0, VESSEL)  # ascending aorta
        self.ellipse(20.0, cy + 0.48 * ay, 12.5, 12.5, VESSEL)
        # Liver dome under the right lung and stomach/spleen under the left, late in the chest.
        dome = _smooth(u, 0.78, 1.0)
        if dome > 0:
            self.ellipse(-0.45 * ax, cy + 10.0, 0.42 * ax * dome, 0.7 * ay * dome, LIVER)
            self.ellipse(0.55 * ax, cy + 35.0, 0.22 * ax * dome, 0.4 * ay * dome, SPLEEN)
        # Sternum anteriorly, spine posteriorly, scapulae in the upper chest.
        if 0.15 < u < 0.85:
            self.ellipse(0.0, cy - ay + fat + 7.0, 14.0, 6.0, CORTEX)
            self.ellipse(0.0, cy - ay + fat + 7.0, 11.0, 3.5, MARROW)
        self.vertebra(cy + 0.5 * ay, 17.0 * s, z)
        scap = 1.0 - _smooth(u, 0.3, 0.55)
        if scap > 0:
            for side in (-1.0, 1.0):
                self.ellipse(
                    side * 0.62 * ax, cy + 0.72 * ay, 40.0 * scap, 5.0, CORTEX, side * -0.45
                )
        self._ribs(ax - fat - 5.0, ay - fat - 5.0, cy, z)

    def _ribs(self, rx: float, ry: float, cy: float, z: float) -> None:
        """Rib sections around the chest wall; each rib is cut where its oblique course crosses
        this slice, so ribs appear and disappear with table position."""
        for k in range(11):
            angle = math.radians(-165.0 + k * 15.0)  # from posterior round to anterior
            for side in (-1.0, 1.0):
                phase = z / 24.0 + k * 0.21
                if math.sin(2 * math.pi * phase) < 0.2:
                    continue
                px = side * rx * math.cos(angle)
                py = cy - ry * math.sin(angle)
                tangent = math.atan2(ry * math.cos(angle), side * rx * math.sin(angle))
                self.ellipse(px, py, 9.0, 4.5, CORTEX, tangent)
                self.ellipse(px, py, 6.0, 2.0, MARROW, tangent)

    def _abdomen(self, u: float, z: float) -> None:
        # u=0 under the diaphragm, u=1 in the pelvis.
        s = self.body_scale
        ax = s * (155.0 + 10.0 * _bump(u, 0.0, 1.0))
        ay = s * (112.0 + 10.0 * _bump(u, 0.1, 0.9))
        cy = 3.0
        fat = 20.0 * s
        self.body(ax, ay, cy, fat)
        liver = 1.0 - _smooth(u, 0.25, 0.6)
        if liver > 0:
            self.ellipse(-0.38 * ax, cy - 8.0, 0.5 * ax * liver, 0.62 * ay * liver, LIVER, 0.2)
            self.ellipse(-0.32 * ax, cy - 2.0, 6.0 * liver, 6.0 * liver, VESSEL)  # portal vein
        spleen = 1.0 - _smooth(u, 0.15, 0.4)
        if spleen > 0:
            self.ellipse(0.58 * ax, cy + 30.0, 0.2 * ax * spleen, 0.4 * ay * spleen, SPLEEN, -0.6)
        stomach = 1.0 - _smooth(u, 0.1, 0.35)
        if stomach > 0:
            self.ellipse(0.3 * ax, cy - 35.0, 45.0 * stomach, 32.0 * stomach, BOWEL, -0.3)
            self.ellipse(0.3 * ax, cy - 50.0, 30.0 * stomach, 14.0 * stomach, GAS, -0.3, BOWEL)
        kidneys = _bump(u, 0.12, 0.6)
        if kidneys > 0:
            for side in (-1.0, 1.0):
                kx, ky = side * 68.0 * s, cy + 0.45 * ay
                self.ellipse(kx, ky, 26.0 * kidneys, 38.0 * kidneys, KIDNEY, side * 0.5)
                self.ellipse(kx, ky, 9.0 * kidneys, 14.0 * kidneys, FAT, side * 0.5)  # sinus
        self._bowel(ax, ay, cy, u)
        # Aorta, inferior vena cava and psoas-level spine; the aorta divides low in the abdomen.
        if u < 0.7:
            self.ellipse(14.0, cy + 0.15 * ay, 11.0, 11.0, VESSEL)
            self.ellipse(-24.0, cy + 0.17 * ay, 12.0, 10.0, BLOOD)
        else:
            for side in (-1.0, 1.0):
                self.ellipse(side * 28.0, cy + 0.15 * ay, 7.0, 7.0, VESSEL)
        self.vertebra(cy + 0.42 * ay, 21.0 * s, z)
        pelvis = _smooth(u, 0.68, 0.95)
        if pelvis > 0:
            for side in (-1.0, 1.0):
                wing = (side * 0.6 * ax, cy + 0.35 * ay)
                self.ellipse(*wing, 55.0 * pelvis, 11.0 * pelvis, CORTEX, side * 1.1)
                self.ellipse(*wing, 50.0 * pelvis, 7.0 * pelvis, MARROW, side * 1.1)
        bladder = _smooth(u, 0.85, 1.0)
        if bladder > 0:
            self.ellipse(0.0, cy - 0.35 * ay, 45.0 * bladder, 35.0 * bladder, FLUID)

    def _bowel(self, ax: float, ay: float, cy: float, u: float) -> None:
        """Bowel loops at seeded positions, each present over its own range of slices."""
        for lx, ly, lu, length, content in self.loops:
            width = _bump(u, lu - 0.25 * length - 0.05, lu + 0.25 * length + 0.05)
            if width <= 0:
                continue
            px = (lx - 0.5) * 1.2 * ax
            py = cy - 0.1 * ay - ly * 0.5 * ay
            self.ellipse(px, py, 18.0 * width, 14.0 * width, BOWEL)
            if content > 0.55:
                self.ellipse(px, py, 12.0 * width, 9.0 * width, GAS, 0.0, BOWEL)
