"""Licence-clean synthetic sample studies (no real patient, no third-party pixels).

`python -m mrg_core.samples [FOLDER]` regenerates assets/samples/ deterministically:
ct_phantom_covid.dcm, ct_phantom_normal.dcm (axial chest CT phantoms) and cr_phantom_pa.dcm
(a PA chest radiograph phantom, MONOCHROME1 12-bit).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
ANONYMOUS = "Anonymous^Phantom"


def _ellipse(shape, cy, cx, ry, rx, angle=0.0) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    y, x = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    return ((x * c + y * s) / rx) ** 2 + ((-x * s + y * c) / ry) ** 2 <= 1.0


def _smooth(img: np.ndarray, passes: int = 2) -> np.ndarray:
    """Cheap box blur (no scipy): softens the phantom's edges like a reconstruction kernel."""
    out = img.astype(np.float32)
    for _ in range(passes):
        out = (np.roll(out, 1, 0) + out + np.roll(out, -1, 0)) / 3.0
        out = (np.roll(out, 1, 1) + out + np.roll(out, -1, 1)) / 3.0
    return out


def make_ct_phantom(seed: int = 0, covid: bool = False, size: int = 512) -> np.ndarray:
    """Axial chest CT slice in HU, (size, size) int16: air, body, lungs, heart, spine, ribs;
    covid=True adds peripheral ground-glass patches (~ -500 HU) in the posterior lower lobes."""
    rng = np.random.default_rng(seed)
    sh, k = (size, size), size / 512.0
    hu = np.full(sh, -1000.0, dtype=np.float32)
    hu[_ellipse(sh, 256 * k, 256 * k, 170 * k, 220 * k)] = -100.0  # subcutaneous fat
    hu[_ellipse(sh, 256 * k, 256 * k, 158 * k, 207 * k)] = 40.0  # muscle / soft tissue
    lungs = []
    for side in (-1, 1):
        lung = _ellipse(sh, 250 * k, (256 + side * 95) * k, 125 * k, 80 * k, side * 0.15)
        hu[lung] = -850.0
        lungs.append(lung)
    hu[_ellipse(sh, 235 * k, 240 * k, 70 * k, 80 * k)] = 40.0  # heart
    hu[_ellipse(sh, 230 * k, 270 * k, 18 * k, 18 * k)] = 45.0  # aorta
    hu[_ellipse(sh, 372 * k, 256 * k, 28 * k, 30 * k)] = 700.0  # vertebral body
    hu[_ellipse(sh, 372 * k, 256 * k, 14 * k, 15 * k)] = 250.0  # cancellous centre
    hu[_ellipse(sh, 120 * k, 256 * k, 10 * k, 30 * k)] = 700.0  # sternum
    for a in np.deg2rad(np.r_[np.arange(20, 160, 22), np.arange(205, 340, 22)]):
        # rib cross-sections just inside the body wall, sparing sternum (top) and spine
        hu[_ellipse(sh, (256 + 146 * np.sin(a)) * k, (256 + 194 * np.cos(a)) * k, 7 * k, 9 * k)] = 700.0
    # vessels: small bright dots in the lungs
    for lung in lungs:
        ys, xs = np.nonzero(lung)
        for j in rng.choice(len(ys), 25, replace=False):
            hu[_ellipse(sh, ys[j], xs[j], 2.5 * k, 2.5 * k)] = 30.0
    if covid:
        for lung, side in zip(lungs, (-1, 1)):
            for _ in range(3):
                cy = (300 + rng.uniform(0, 55)) * k  # posterior (lower in the image)
                cx = (256 + side * (140 + rng.uniform(0, 25))) * k  # peripheral
                patch = _ellipse(sh, cy, cx, rng.uniform(18, 30) * k, rng.uniform(12, 22) * k,
                                 rng.uniform(0, np.pi))
                hu[patch & lung] = -500.0
    hu = _smooth(hu) + rng.normal(0, 12, sh).astype(np.float32)  # quantum noise
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def make_cr_phantom(seed: int = 0, rows: int = 560, cols: int = 480) -> np.ndarray:
    """PA chest radiograph as *attenuation* in 0..1 (1 = bone, 0 = air), float32."""
    rng = np.random.default_rng(seed)
    sh = (rows, cols)
    cy, cx = rows * 0.52, cols / 2
    att = np.zeros(sh, np.float32)
    att[_ellipse(sh, cy, cx, rows * 0.47, cols * 0.45)] = 0.55  # soft tissue of the trunk
    for side in (-1, 1):
        att[_ellipse(sh, cy - rows * 0.02, cx + side * cols * 0.2, rows * 0.33, cols * 0.16)] = 0.15
    att[_ellipse(sh, cy + rows * 0.08, cx + cols * 0.03, rows * 0.17, cols * 0.16)] = 0.6  # heart
    body = att > 0
    spine = np.zeros(sh, bool)
    spine[:, int(cx - cols * 0.045): int(cx + cols * 0.045)] = True
    att[spine & body] += 0.25  # spine / mediastinum
    for i in range(9):  # ribs: arcs across each lung field
        y0 = rows * (0.2 + i * 0.065)
        xx = np.arange(cols, dtype=np.float32)
        yy = y0 + 0.0009 * (xx - cx) ** 2 * (rows / 560)
        for x, y in zip(xx.astype(int), yy.astype(int)):
            if 0 <= y < rows - 6 and abs(x - cx) > cols * 0.05 and abs(x - cx) < cols * 0.4:
                att[y: y + 6, x] += 0.2
    att[_ellipse(sh, rows * 0.12, cx, rows * 0.03, cols * 0.3) & body] += 0.3  # clavicles
    att = _smooth(att, 3) + rng.normal(0, 0.01, sh).astype(np.float32)
    return np.clip(att, 0, 1)


def new_dataset(sop_class_uid: str, modality: str, seed: str) -> Dataset:
    """An image dataset with no patient data: type-2 attributes empty, deterministic UIDs."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "instance"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, "series"])
    ds.Modality = modality
    ds.PatientName = ANONYMOUS
    for kw in ("PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(ds, kw, "")
    ds.Manufacturer = "MRG Studio synthetic phantom"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.BodyPartExamined = "CHEST"
    return ds


def write_ct_dicom(path, hu: np.ndarray, seed: str = "ct", spacing: float = 0.7):
    """CT Image Storage file. Stored unsigned 12-bit as HU + 1024 with RescaleIntercept -1024
    (the common scanner convention; HU -1024..3071 fits 12 bits)."""
    ds = new_dataset(CT_IMAGE_STORAGE, "CT", seed)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    stored = (np.clip(hu.astype(np.int32), -1024, 3071) + 1024).astype(np.uint16)
    ds.set_pixel_data(stored, "MONOCHROME2", 12, generate_instance_uid=False)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = -600, 1500
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.ImagePositionPatient = [-hu.shape[1] * spacing / 2, -hu.shape[0] * spacing / 2, 0.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_cr_dicom(path, attenuation: np.ndarray, seed: str = "cr", spacing: float = 0.7):
    """CR Image Storage, MONOCHROME1 12-bit: high stored value = dark, so bone (high
    attenuation) is stored low. A window over the full range is included."""
    ds = new_dataset(CR_IMAGE_STORAGE, "CR", seed)
    stored = np.round((1.0 - np.clip(attenuation, 0, 1)) * 4095).astype(np.uint16)
    ds.set_pixel_data(stored, "MONOCHROME1", 12, generate_instance_uid=False)
    ds.ViewPosition = "PA"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.save_as(path, enforce_file_format=True)
    return ds


SAMPLES = {
    "ct_phantom_covid.dcm": lambda p: write_ct_dicom(p, make_ct_phantom(1, True), "ct-covid"),
    "ct_phantom_normal.dcm": lambda p: write_ct_dicom(p, make_ct_phantom(2, False), "ct-normal"),
    "cr_phantom_pa.dcm": lambda p: write_cr_dicom(p, make_cr_phantom(3), "cr-pa"),
}


def main(argv: list[str] | None = None) -> int:
    from .paths import SAMPLES_DIR

    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0]) if argv else SAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in SAMPLES.items():
        write(folder / name)
        print(f"wrote {folder / name} ({(folder / name).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
