"""The ELBO's latent draws, keyed by the record they belong to (docs/design.md §2, law 1).

A per-record quantity under DP (a clipped gradient, a soft count) may depend on its record and
on public values only. If draws were handed out by a record's position in its batch, removing
one record would shift every later record's draw: the clipped gradient sum of a neighbouring
dataset would then move by up to twice the batch's clipped norm instead of by one clipping
norm C (measured on main before this module: 2.6-3.0 C on a digits client), and DP-SGD's
analysis (Abadi et al., CCS 2016, which needs sensitivity C) would not hold.

So record i's draws are SHAKE-256(context || bytes of record i), read as uniforms and mapped
through the normal quantile function: a function of the record's own values and of a public
context (the run seed, round and step), whatever else shares its batch, and the same in any
block of any pass. Two identical records get identical draws, as a function of the record must.
The draws are public randomness, not noise: nothing private needs them unguessable.

Written by hand because neither numpy nor torch has a generator keyed per row of a batch; the
hash (hashlib) and the quantile function (scipy) are the libraries'.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from scipy.special import ndtri
from torch import Tensor

_MANTISSA = 2.0**-53


def draw_context() -> int:
    """A pass's public context: one draw from torch's global generator, which callers seed from
    public values (run seed, round, client, step). The only draw a mixture's forward pass makes
    from it (privacy.dpsgd.check_record_randomness holds user components to that)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def record_keyed_normals(x: Tensor, context: int, per_record: tuple[int, ...]) -> Tensor:
    """(batch, *per_record) standard normals; row i depends on (context, x[i]) alone."""
    rows = np.ascontiguousarray(x.detach().cpu().to(torch.float32).reshape(len(x), -1).numpy())
    count = int(np.prod(per_record))
    prefix = context.to_bytes(16, "little", signed=False)
    words = np.empty((len(rows), count), dtype=np.uint64)
    for i, row in enumerate(rows):
        words[i] = np.frombuffer(hashlib.shake_256(prefix + row.tobytes()).digest(8 * count), dtype=np.uint64)
    # 53 random bits per uniform, centred in its cell: never 0 or 1, so the quantile is finite.
    uniforms = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * _MANTISSA
    normals = ndtri(uniforms).astype(np.float32).reshape(len(rows), *per_record)
    return torch.from_numpy(normals).to(device=x.device, dtype=x.dtype)
