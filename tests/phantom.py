"""A synthetic run with known rigid motion: smooth blobs defined in world mm."""
import numpy as np

from fmri_preproc import params_to_affine


def moving_blobs(shape, affine, motion, centres, *, head_mm, head_amp: float,
                 blob_sigma_mm: float, baseline: float = 0.0) -> np.ndarray:
    """float32 run whose volume t shows the reference moved by ``motion[t]``.

    Parameters
    ----------
    shape : tuple of int
        3D grid; ``affine`` maps it to world mm.
    motion : ndarray, shape (n_volumes, 6)
        Engine convention (:func:`fmri_preproc.params_to_affine`): mm and radians.
    centres : ndarray, shape (n_blobs, 3)
        Blob centres in world mm, each blob of amplitude 300.
    head_mm : sequence of 3 float
        Radii of the Gaussian "head" of amplitude ``head_amp``.
    """
    ijk = np.indices(shape).reshape(3, -1)
    world = (affine[:3, :3] @ ijk + affine[:3, 3:4]).T
    data = np.empty((*shape, len(motion)), dtype=np.float32)
    for t, params in enumerate(motion):
        # Sample the reference where the tissue now at each voxel came from.
        inverse = np.linalg.inv(params_to_affine(params, affine, shape))
        w = world @ inverse[:3, :3].T + inverse[:3, 3]
        volume = head_amp * np.exp(-np.sum((w / np.asarray(head_mm)) ** 2, axis=1))
        for c in centres:
            volume += 300 * np.exp(-np.sum((w - c) ** 2, axis=1) / (2 * blob_sigma_mm**2))
        data[..., t] = volume.reshape(shape) + baseline
    return data
