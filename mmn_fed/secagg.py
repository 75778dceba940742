"""Secure aggregation, the arithmetic and wire names both sides share: pairwise masking per module
(Bonawitz et al., CCS 2017, "double masking"). flwr-free (numpy + cryptography): the site's Flower glue is
``clients.secagg``, the server's relay and unmasking ``server.secagg``.

The server learns only, for every module, the sum over the sites that hold it of ``count * value`` and the
sum of the counts: the per-module weighted average, never one site's update. Here: the round plan,
fixed-point encoding, mask expansion, Shamir sharing, key agreement, one site's side of a round
(``SecAggClient``, also run in-process by ``server.secagg.run_round``) and the record/action names.

One round, four messages (the server only relays):
1. ``advertise_keys``: two fresh X25519 public keys per site (one to encrypt shares, one to mask).
2. ``share_keys``: Shamir shares (threshold t) of the site's masking private key and of one self-mask seed
   per module, each encrypted (AES-GCM, key from X25519 + HKDF) for one other site.
3. ``mask_update``: for each module m the site holds, ``y = q(count*value) || q(count)`` plus the
   self-mask ``PRG(b_m)`` plus ``+/-PRG(k_ij,m)`` for every other site j that holds m, all mod 2^64.
   Pairwise masks cancel in the sum; the self-mask protects a site the server wrongly calls dropped.
4. ``unmask_shares``: given the sites that sent step 3, reveal self-mask shares of survivors and
   masking-key shares of dropped sites (never both for one site), so the server can remove what is left.

Fixed point: ``q(x) = round(x * 2^f)`` in Z_2^64 (two's complement). The error of a module's weighted
average is at most ``n_sites * 2^-(f+1) / total_count`` per coordinate (f = 24: 3e-8 * n / N); values
must satisfy ``|count * value| < 2^(62-f) / n_sites`` or the site refuses to encode them.
"""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .modules import module_of

FRAC_BITS = 24
PRIME = 2**521 - 1  # Mersenne prime: Shamir field for 32-byte secrets
COUNT_SLOT = "__count__"

# ---- wire names (message types are ``query.<action>``; server.secagg.SecAggRound sends them) -------------
SECAGG = "secagg"  # record name, in both directions
MASKED = "secagg-masked"  # ArrayRecord of masked vectors in the train reply (replaces "arrays" and "counts")
KEYS_ACTION, SHARES_ACTION, UNMASK_ACTION = "secagg_keys", "secagg_shares", "secagg_unmask"


class SecAggError(RuntimeError):
    """The secure-aggregation protocol cannot go on (too few sites, inconsistent plan, value out of range)."""


# ---- the round plan: what every party agrees on before step 1 ----------------------------------

@dataclass(frozen=True)
class RoundPlan:
    """Sites of the round (sorted names), the modules each one sends, the flat layout of every module
    (parameter names in sorted order with shapes; a count slot follows), Shamir threshold t,
    fixed-point fraction bits, and the least number of surviving holders for a module to be revealed."""

    round: int
    sites: tuple[str, ...]
    modules: Mapping[str, tuple[str, ...]]  # site -> modules it sends
    layout: Mapping[str, tuple[tuple[str, tuple[int, ...]], ...]]  # module -> ((param, shape), ...)
    threshold: int
    frac_bits: int = FRAC_BITS
    min_holders: int = 2

    def holders(self, module: str) -> list[str]:
        return [s for s in self.sites if module in self.modules.get(s, ())]

    def size(self, module: str) -> int:
        """Length of a module's masked vector: its parameters flattened, then one count slot."""
        return sum(int(np.prod(shape, dtype=np.int64)) for _, shape in self.layout[module]) + 1

    def index(self, site: str) -> int:
        """Shamir x-coordinate of a site (1-based)."""
        return self.sites.index(site) + 1

    def to_json(self) -> str:
        d = asdict(self)
        d["layout"] = {m: [[k, list(s)] for k, s in v] for m, v in self.layout.items()}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RoundPlan":
        d = json.loads(text)
        return cls(round=d["round"], sites=tuple(d["sites"]),
                   modules={s: tuple(m) for s, m in d["modules"].items()},
                   layout={m: tuple((k, tuple(s)) for k, s in v) for m, v in d["layout"].items()},
                   threshold=d["threshold"], frac_bits=d["frac_bits"], min_holders=d["min_holders"])


def default_threshold(n_sites: int) -> int:
    """t = n - ceil(n/3), at least 2: a round survives ceil(n/3) >= n/3 dropouts; the server together
    with up to t-1 colluding sites learns nothing about another site's update."""
    return max(2, n_sites - -(-n_sites // 3))


# ---- fixed point ---------------------------------------------------------------------------------

def quantize(x: np.ndarray, frac_bits: int, n_sites: int) -> np.ndarray:
    """float -> Z_2^64 (uint64, two's complement). Raises SecAggError if the sum could overflow."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise SecAggError("cannot encode non-finite values for secure aggregation")
    limit = 2.0 ** (62 - frac_bits) / max(n_sites, 1)
    if x.size and np.max(np.abs(x)) >= limit:
        raise SecAggError(f"a count-scaled value ({np.max(np.abs(x)):.3g}) exceeds the fixed-point range "
                          f"{limit:.3g} for {n_sites} sites at {frac_bits} fraction bits")
    return np.rint(x * 2.0**frac_bits).astype(np.int64).view(np.uint64)


def dequantize(q: np.ndarray, frac_bits: int) -> np.ndarray:
    return np.asarray(q, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**frac_bits


def prg(seed: bytes, n: int) -> np.ndarray:
    """n uniform uint64 words from a 32-byte seed: the ChaCha20 keystream (a cryptographic PRG)."""
    enc = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\x00" * (8 * n)), dtype=np.uint64).copy()


def _hkdf(secret: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(secret)


def pair_seed(shared: bytes, round_: int, module: str) -> bytes:
    """Seed of the mask two sites share for one module in one round."""
    return _hkdf(shared, f"mmn-fed/secagg/v1/mask/{round_}/{module}")


def self_seed(b: bytes, round_: int, module: str) -> bytes:
    return _hkdf(b, f"mmn-fed/secagg/v1/self/{round_}/{module}")


def pair_sign(me: str, other: str) -> int:
    """+1 if ``me`` sorts before ``other``: the two ends of a pair add opposite masks."""
    return 1 if me < other else -1


# ---- key agreement (X25519, raw 32-byte keys) -------------------------------------------------------

def new_private_key() -> bytes:
    """A fresh X25519 private key, raw bytes."""
    return X25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                     serialization.NoEncryption())


def raw_public(private: bytes) -> bytes:
    """The raw public key of a raw X25519 private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(serialization.Encoding.Raw,
                                                                                 serialization.PublicFormat.Raw)


def agree(private: bytes, other_public: bytes) -> bytes:
    """The X25519 secret two parties share (each with its private key and the other's public key)."""
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(other_public))


def pair_mask(private: bytes, other_public: bytes, round_: int, module: str, n: int) -> np.ndarray:
    """The mask two sites share for one module in one round (either end computes it; the server too,
    from a dropped site's reconstructed key)."""
    return prg(pair_seed(agree(private, other_public), round_, module), n)


# ---- Shamir secret sharing over GF(2^521 - 1) ---------------------------------------------------------

def shamir_split(secret: bytes, n: int, t: int) -> list[int]:
    """Shares at x = 1..n of a secret (<= 64 bytes); any t of them recover it, fewer reveal nothing."""
    if not 1 <= t <= n:
        raise SecAggError(f"threshold {t} must be between 1 and the number of sites {n}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        shares.append(y)
    return shares


def shamir_combine(shares: Mapping[int, int], length: int = 32) -> bytes:
    """Lagrange interpolation at 0 of {x: share}; needs at least t shares."""
    xs = list(shares)
    total = 0
    for xi in xs:
        num, den = 1, 1
        for xj in xs:
            if xj != xi:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + shares[xi] * num * pow(den, -1, PRIME)) % PRIME
    return total.to_bytes(length, "big")


# ---- one site's side of a round ----------------------------------------------------------------------------------



def flatten_module(plan: RoundPlan, module: str, params: Mapping[str, np.ndarray], count: float) -> np.ndarray:
    """A module's parameters in layout order times its count, then the count: the vector that is masked."""
    parts = []
    for name, shape in plan.layout[module]:
        if name not in params:
            raise SecAggError(f"module '{module}' lacks parameter '{name}'")
        v = np.asarray(params[name], dtype=np.float64)
        if v.shape != tuple(shape):
            raise SecAggError(f"parameter '{name}' has shape {v.shape}, expected {tuple(shape)}")
        parts.append(v.ravel() * float(count))
    parts.append(np.array([float(count)]))
    return np.concatenate(parts)


@dataclass
class SecAggClient:
    """One site's side of one secure-aggregation round. Holds the round's secrets between messages;
    ``export_state``/``from_state`` carry them in ``context.state`` across ClientApp invocations
    (the state stays on the site's SuperNode)."""

    site: str
    plan: RoundPlan
    c_key: bytes = field(default_factory=new_private_key, repr=False)
    s_key: bytes = field(default_factory=new_private_key, repr=False)
    b_seeds: dict[str, bytes] = field(default_factory=dict, repr=False)
    public: dict[str, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)  # site -> (c_pk, s_pk)
    held: dict[str, dict] = field(default_factory=dict, repr=False)  # src site -> decrypted shares
    partners: tuple[str, ...] = ()  # sites whose shares arrived: the round's members after step 2
    masked_sent: bool = False

    def __post_init__(self) -> None:
        if self.site not in self.plan.sites:
            raise SecAggError(f"site '{self.site}' is not in the round plan")
        if self.plan.threshold < 2 or self.plan.min_holders < 1 or self.plan.threshold > len(self.plan.sites):
            raise SecAggError(f"refusing a plan with threshold {self.plan.threshold} and min_holders "
                              f"{self.plan.min_holders} for {len(self.plan.sites)} sites")
        if not self.b_seeds:
            self.b_seeds = {m: os.urandom(32) for m in self.my_modules}

    @property
    def my_modules(self) -> tuple[str, ...]:
        return tuple(self.plan.modules.get(self.site, ()))

    # step 1
    def advertise_keys(self) -> dict[str, bytes]:
        return {"c_pk": raw_public(self.c_key), "s_pk": raw_public(self.s_key)}

    # step 2
    def share_keys(self, adverts: Mapping[str, Mapping[str, bytes]]) -> dict[str, bytes]:
        """Encrypted shares for every other advertised site: {destination site: ciphertext}."""
        if len(adverts) < self.plan.threshold:
            raise SecAggError(f"only {len(adverts)} sites advertised keys; the threshold is {self.plan.threshold}")
        if adverts.get(self.site) != self.advertise_keys():
            raise SecAggError("the server relayed a different key for this site")
        self.public = {s: (a["c_pk"], a["s_pk"]) for s, a in adverts.items() if s in self.plan.sites}
        n, t = len(self.plan.sites), self.plan.threshold
        s_shares = shamir_split(self.s_key, n, t)
        b_shares = {m: shamir_split(b, n, t) for m, b in self.b_seeds.items()}
        out = {}
        for dst in sorted(self.public):
            i = self.plan.index(dst) - 1
            payload = {"s": hex(s_shares[i]), "b": {m: hex(v[i]) for m, v in b_shares.items()}}
            if dst == self.site:
                self.held[self.site] = payload
                continue
            out[dst] = self._seal(dst, json.dumps(payload).encode())
        return out

    # step 3
    def mask_update(self, params: Mapping[str, np.ndarray], counts: Mapping[str, float],
                    inbox: Mapping[str, bytes]) -> dict[str, np.ndarray]:
        """{module: masked uint64 vector} for the modules the plan says this site sends.

        ``inbox`` holds the ciphertexts other sites addressed to this one (relayed by the server); the
        sites they came from are the round's members: masks are agreed with those only."""
        for src, ct in inbox.items():
            if src not in self.public:
                raise SecAggError(f"share from '{src}', which did not advertise keys")
            self.held[src] = json.loads(self._open(src, ct))
        self.partners = tuple(sorted(set(inbox) | {self.site}))
        if len(self.partners) < self.plan.threshold:
            raise SecAggError(f"only {len(self.partners)} sites shared keys; the threshold is {self.plan.threshold}")
        extra = {module_of(k) for k in params} - set(self.my_modules)
        if extra:
            raise SecAggError(f"parameters of modules not in this site's plan: {sorted(extra)}")
        n = len(self.plan.sites)
        out = {}
        for m in self.my_modules:
            vec = quantize(flatten_module(self.plan, m, params, counts.get(m, 0.0)), self.plan.frac_bits, n)
            vec += prg(self_seed(self.b_seeds[m], self.plan.round, m), vec.size)
            for j in self.plan.holders(m):
                if j == self.site or j not in self.partners:
                    continue
                mask = pair_mask(self.s_key, self.public[j][1], self.plan.round, m, vec.size)
                vec = vec + mask if pair_sign(self.site, j) > 0 else vec - mask
            out[m] = vec
        self.masked_sent = True
        return out

    # step 4
    def unmask_shares(self, survivors: Sequence[str]) -> dict[str, dict]:
        """Given the sites whose masked updates arrived: self-mask shares of survivors (per module, only
        for modules with at least ``min_holders`` surviving holders) and masking-key shares of dropped
        members. Never both for one site, whatever the server asks."""
        if not self.masked_sent:
            raise SecAggError("asked to unmask before this site sent its masked update")
        alive = set(survivors)
        if not alive <= set(self.partners) or self.site not in alive:
            raise SecAggError("the survivor list names sites outside this round or omits this site")
        if len(alive) < self.plan.threshold:
            raise SecAggError(f"only {len(alive)} survivors; the threshold is {self.plan.threshold}")
        revealable = {m for m in self.plan.layout
                      if len([h for h in self.plan.holders(m) if h in alive]) >= self.plan.min_holders}
        b_out, s_out = {}, {}
        for src, payload in self.held.items():
            if src in alive:
                b_out[src] = {m: v for m, v in payload["b"].items() if m in revealable}
            elif src in self.partners:
                s_out[src] = payload["s"]
        return {"b": b_out, "s": s_out}

    # share encryption: AES-GCM under a key both ends derive from their X25519 "c" keys
    def _box(self, other: str) -> AESGCM:
        return AESGCM(_hkdf(agree(self.c_key, self.public[other][0]), f"mmn-fed/secagg/v1/share/{self.plan.round}"))

    def _aad(self, src: str, dst: str) -> bytes:
        return f"{self.plan.round}|{src}|{dst}".encode()

    def _seal(self, dst: str, data: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._box(dst).encrypt(nonce, data, self._aad(self.site, dst))

    def _open(self, src: str, ct: bytes) -> bytes:
        return self._box(src).decrypt(ct[:12], ct[12:], self._aad(src, self.site))

    # persistence across ClientApp invocations (Flower's context.state)
    def export_state(self) -> bytes:
        d = {"site": self.site, "plan": self.plan.to_json(), "c_key": self.c_key.hex(), "s_key": self.s_key.hex(),
             "b_seeds": {m: b.hex() for m, b in self.b_seeds.items()},
             "public": {s: [c.hex(), p.hex()] for s, (c, p) in self.public.items()},
             "held": self.held, "partners": list(self.partners), "masked_sent": self.masked_sent}
        return json.dumps(d).encode()

    @classmethod
    def from_state(cls, data: bytes) -> "SecAggClient":
        d = json.loads(data)
        return cls(site=d["site"], plan=RoundPlan.from_json(d["plan"]), c_key=bytes.fromhex(d["c_key"]),
                   s_key=bytes.fromhex(d["s_key"]), b_seeds={m: bytes.fromhex(b) for m, b in d["b_seeds"].items()},
                   public={s: (bytes.fromhex(c), bytes.fromhex(p)) for s, (c, p) in d["public"].items()},
                   held=d["held"], partners=tuple(d["partners"]), masked_sent=d["masked_sent"])
