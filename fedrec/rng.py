"""Counter-based randomness keyed by (seed, round, user, stream), vectorised over users.

Cross-device training must give every user the same random draws whether it runs alone (one
Flower client per user) or inside a vectorised shard of hundreds of users, and whichever node hosts
it. Stateful generators cannot do that without a Python loop over users; a counter-based generator
can: each value is a hash (SplitMix64) of the user's key and the value's index, computed for all
users at once with NumPy's wrapping uint64 arithmetic.

The same hash is written in torch (``splitmix64_torch``, ``uniform_torch``, ...) for tensors on any
device: torch has no uint64 arithmetic, so it works on the keys' bit patterns as int64, whose
multiplication wraps identically, with right shifts made logical by masking the sign bits. It gives
bit-identical values to the NumPy functions (``tests/test_devices.py``). ``UserRandom`` draws with
NumPy on the CPU (the reference, and faster there: no change to CPU results or speed) and with the
torch version on any other device, so a GPU's draws are built on the GPU.
"""

from __future__ import annotations

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (np.asarray(x, dtype=np.uint64) + _GOLDEN).astype(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def user_keys(seed: int, round_: int, users: np.ndarray, stream: int) -> np.ndarray:
    """One uint64 key per user for (seed, round, stream)."""
    with np.errstate(over="ignore"):
        base = splitmix64(np.uint64(seed) * np.uint64(1_000_003) + np.uint64(round_))
        base = splitmix64(base ^ np.uint64(stream) * _GOLDEN)
        return splitmix64(base ^ np.asarray(users, dtype=np.uint64))


def uniform(keys: np.ndarray, n: int) -> np.ndarray:
    """(len(keys), n) float64 uniforms in (0, 1), distinct per key and index."""
    with np.errstate(over="ignore"):
        h = splitmix64(keys[:, None] ^ (np.arange(n, dtype=np.uint64)[None] * _M2 + _GOLDEN))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def key_uniform(keys: np.ndarray) -> np.ndarray:
    """One uniform per key (used for sampling coins)."""
    return uniform(keys, 1)[:, 0]


def normal(keys: np.ndarray, n: int) -> torch.Tensor:
    """(len(keys), n) standard normals (Box-Muller), float32."""
    m = (n + 1) // 2
    u = uniform(keys, 2 * m)
    r = np.sqrt(-2.0 * np.log(u[:, :m]))
    theta = 2.0 * np.pi * u[:, m:]
    z = np.concatenate([r * np.cos(theta), r * np.sin(theta)], axis=1)[:, :n]
    return torch.from_numpy(z.astype(np.float32))


def randint(keys: np.ndarray, n: int, high: int) -> torch.Tensor:
    """(len(keys), n) integers uniform in [0, high)."""
    return torch.from_numpy(np.minimum((uniform(keys, n) * high).astype(np.int64), high - 1))


def bernoulli_keep(keys: np.ndarray, n: int, p_drop: float) -> torch.Tensor:
    """Inverted-dropout mask: 0 with probability p_drop, else 1/(1-p_drop)."""
    if p_drop <= 0:
        return torch.ones(len(keys), n)
    keep = uniform(keys, n) >= p_drop
    return torch.from_numpy(keep.astype(np.float32) / (1.0 - p_drop))


# --------------------------------------------------------------------------- the same hash in torch
def _signed(c: np.uint64) -> int:
    """A uint64 constant as the int64 with the same bits."""
    c = int(c)
    return c - (1 << 64) if c >= 1 << 63 else c


_T_GOLDEN, _T_M1, _T_M2 = _signed(_GOLDEN), _signed(_M1), _signed(_M2)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic: mask the sign copies)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64_torch(x: torch.Tensor) -> torch.Tensor:
    """``splitmix64`` on int64 tensors holding uint64 bit patterns, on the tensor's device."""
    z = x + _T_GOLDEN
    z = (z ^ _shr(z, 30)) * _T_M1
    z = (z ^ _shr(z, 27)) * _T_M2
    return z ^ _shr(z, 31)


def keys_torch(keys: np.ndarray, device) -> torch.Tensor:
    """uint64 keys as an int64 tensor with the same bits, on ``device`` (one value per user)."""
    return torch.from_numpy(np.ascontiguousarray(keys, dtype=np.uint64).view(np.int64)).to(device)


def uniform_torch(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``uniform`` (float64) on the keys' device; ``keys`` from :func:`keys_torch`."""
    idx = torch.arange(n, dtype=torch.int64, device=keys.device) * _T_M2 + _T_GOLDEN
    h = splitmix64_torch(keys[:, None] ^ idx[None])
    return (_shr(h, 11).double() + 0.5) / float(1 << 53)


def normal_torch(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``normal`` on the keys' device."""
    m = (n + 1) // 2
    u = uniform_torch(keys, 2 * m)
    r = torch.sqrt(-2.0 * torch.log(u[:, :m]))
    theta = 2.0 * np.pi * u[:, m:]
    return torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=1)[:, :n].float()


def randint_torch(keys: torch.Tensor, n: int, high: int) -> torch.Tensor:
    """``randint`` on the keys' device."""
    return torch.clamp((uniform_torch(keys, n) * high).long(), max=high - 1)


def bernoulli_keep_torch(keys: torch.Tensor, n: int, p_drop: float) -> torch.Tensor:
    """``bernoulli_keep`` on the keys' device."""
    if p_drop <= 0:
        return torch.ones(len(keys), n, device=keys.device)
    scale = float(np.float32(1.0) / np.float32(1.0 - p_drop))  # NumPy's float32 quotient, exactly
    keep = uniform_torch(keys, n) >= p_drop
    return keep.float() * scale


def uses_torch_hash(device: torch.device) -> bool:
    """Whether draws for ``device`` are hashed in torch (any accelerator) rather than NumPy (CPU)."""
    return device.type != "cpu"


class UserRandom:
    """The random draws of a batch of users for one local step: ``draw.normal(stream, n)`` etc.,
    as tensors on ``device`` (hashed there when it is not the CPU)."""

    def __init__(self, seed: int, round_: int, users: np.ndarray, step: int, device="cpu"):
        self.seed, self.round, self.users, self.step = seed, round_, np.asarray(users), step
        self.device = torch.device(device)
        self._torch = uses_torch_hash(self.device)

    def keys(self, stream: int) -> np.ndarray:
        return user_keys(self.seed, self.round, self.users, 1000 * self.step + stream)

    def _tkeys(self, stream: int) -> torch.Tensor:
        return keys_torch(self.keys(stream), self.device)

    def normal(self, stream: int, n: int) -> torch.Tensor:
        return normal_torch(self._tkeys(stream), n) if self._torch else normal(self.keys(stream), n)

    def randint(self, stream: int, n: int, high: int) -> torch.Tensor:
        return randint_torch(self._tkeys(stream), n, high) if self._torch else randint(self.keys(stream), n, high)

    def uniform(self, stream: int, n: int) -> torch.Tensor:
        if self._torch:
            return uniform_torch(self._tkeys(stream), n).float()
        return torch.from_numpy(uniform(self.keys(stream), n).astype(np.float32))

    def keep_mask(self, stream: int, n: int, p_drop: float) -> torch.Tensor:
        if self._torch:
            return bernoulli_keep_torch(self._tkeys(stream), n, p_drop)
        return bernoulli_keep(self.keys(stream), n, p_drop)


def uniform_tensor(keys: np.ndarray, n: int, device) -> torch.Tensor:
    """``uniform`` as float32 on ``device`` (hashed there when it is not the CPU)."""
    device = torch.device(device)
    if uses_torch_hash(device):
        return uniform_torch(keys_torch(keys, device), n).float()
    return torch.from_numpy(uniform(keys, n).astype(np.float32))


# --------------------------------------------------------------------------- keyed stateful streams
# Stateful draws (a silo's mini-batch order, torch's dropout and diffusion noise, Opacus's Poisson
# sampling and noise, the server's node sampling and DP noise) come from generators seeded by a key
# (seed, node or user, round, purpose), never from one generator shared across nodes or rounds.
PURPOSE_TRAIN = 1  # torch's global generator during a node's local training (noise, timesteps, dropout)
PURPOSE_SHUFFLE = 2  # mini-batch order
PURPOSE_DP_SAMPLING = 3  # Opacus's Poisson sampling of users
PURPOSE_DP_NOISE = 4  # Opacus's Gaussian noise on the clipped gradient sum
PURPOSE_NODE_SAMPLING = 5  # which silos train in a round (server)
PURPOSE_SERVER_NOISE = 6  # the server's DP noise (node-level DP through Flower's wrapper)
PURPOSE_EVAL = 7  # torch's global generator while a node evaluates (a sampler with noise, if configured)


def stream_seed(*key: int) -> int:
    """A 63-bit seed for the stream named by ``key`` (e.g. seed, node, round, purpose)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def numpy_stream(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def torch_stream(*key: int, device="cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded for ``key`` (a CUDA generator's stream differs from the CPU's)."""
    return torch.Generator(device=device).manual_seed(stream_seed(*key))
