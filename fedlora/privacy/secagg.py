"""SecAgg+ for adapter updates: the protocol's maths, with no Flower in it.

Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020, https://eprint.iacr.org/2020/704 (SecAgg+),
after Bonawitz et al., CCS 2017 (SecAgg). The server learns the weighted sum of
the updates of the clients that finished, and nothing else about any one of them:

1. **keys**: each client makes two X25519 key pairs, one to encrypt the shares it
   sends its neighbours, one to agree on pairwise masks with them, and sends the
   public keys;
2. **shares**: each client draws a self-mask seed ``b`` and Shamir-shares ``b`` and
   its mask private key among itself and its neighbours (threshold ``t``), each
   share encrypted for its holder (authenticated: Fernet), and commits to ``b``
   (SHA-256); the server forwards the ciphertexts;
3. **masked input**: each client quantises its update to integers modulo 2^64 (the
   ``uint64`` ring, so additions wrap on their own), multiplies them by its weight,
   appends the weight, and adds PRG(``b``) and, per neighbour j, ±PRG(s_ij), s_ij
   agreed with j's mask key (``+`` towards a larger index): summed over the
   clients, the pairwise masks cancel;
4. **unmask**: the clients still there send, for each client whose masked input
   arrived, their share of its ``b`` and, for each client that dropped after the
   shares, their share of its mask key; never both for one client. From ``t``
   shares the server rebuilds each ``b`` (checked against the commitment) and each
   dropped client's key (checked against its public key), removes those masks and
   is left with the sum.

SecAgg+ replaces "everyone is everyone's neighbour" (SecAgg) by a random
``k``-regular graph (:func:`neighbours`), so a client's cost grows with ``k``, not
with the number of clients. The threshold ``t = k+1 - floor(f·(k+1))`` for a
dropout fraction ``f < 1/2`` lets ``f`` of a client's share holders drop and keeps
``t`` above half of them, so the server can never get both secrets of a client.

Quantisation: an update value ``x``, clipped to ``[-c, c]``, becomes
``round((x + c)·T/(2c))`` with unbiased stochastic rounding (Flower's
:func:`~flwr.common.secure_aggregation.quantization.quantize`), an integer in
``0..T``. The server decodes ``Σ w_i q_i`` and ``Σ w_i`` to the weighted mean
``(2c/T)·Σ w_i q_i / Σ w_i - c``; each ``q_i`` is within ``2c/T`` of the exact
value, so the mean is too: **the secure mean differs from the plain weighted mean
by less than ``2c/T`` per element** for updates within ``[-c, c]``. The ring holds
the sum while ``T·Σ w_i < 2^64`` (:func:`check_ring`).

Groups: when tensors are shared by different sets of clients (MTLoRA's tasks),
one masked input carries one secure sum per group: the vector is every group's
segment followed by one weight per group, and a client puts zeros and weight 0
in the groups it is not in (:func:`lay_out`, :func:`encode`), so each group's
sum covers exactly its own clients and costs no extra protocol stage (the upload
is as long as all groups' tensors together).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidKey
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

KEY_BYTES = 32  # X25519 keys, self-mask seeds and PRG keys
RING_BITS = 64  # masked values live in uint64: arithmetic modulo 2^64
ENCRYPTION, MASKING = b"fedlora-secagg-encryption", b"fedlora-secagg-mask"  # HKDF labels: one key per purpose


class ProtocolError(ValueError):
    """A protocol message is malformed or the round cannot be completed; the message names who and why."""


# --- primitives ----------------------------------------------------------------------------------------------------


def keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes (private, public)."""
    private = X25519PrivateKey.generate()
    return private.private_bytes_raw(), public_of(private.private_bytes_raw())


def public_of(private: bytes) -> bytes:
    """The raw public key of a raw X25519 private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private: bytes, public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both ends of a pair derive (X25519, then HKDF-SHA256 labelled with ``purpose``)."""
    try:
        secret = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except (ValueError, InvalidKey) as err:
        raise ProtocolError(f"key agreement failed: {err}") from err
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose).derive(secret)


def prg(seed: bytes, size: int) -> np.ndarray:
    """``size`` pseudo-random ``uint64`` values expanded from a 32-byte seed (the ChaCha20 key stream)."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * size)), dtype=np.uint64).copy()


def fernet_key(key: bytes) -> bytes:
    """A 32-byte key in the urlsafe base64 form Fernet (Flower's ``encrypt``/``decrypt``) takes."""
    return base64.urlsafe_b64encode(key)


def neighbours(indices: Sequence[int], num_shares: int, seed: int) -> dict[int, list[int]]:
    """SecAgg+'s graph: the clients on a ring in a random order, each linked to ``num_shares // 2`` either side.

    ``num_shares`` 0, or at least the number of other clients: everyone is everyone's neighbour (SecAgg).
    """
    order = sorted(indices)
    if num_shares == 0 or num_shares >= len(order) - 1:
        return {i: [j for j in order if j != i] for i in order}
    random.Random(seed).shuffle(order)
    half, n = max(1, num_shares // 2), len(order)
    return {order[p]: sorted({order[(p + d) % n] for d in range(-half, half + 1) if d} - {order[p]}) for p in range(n)}


def threshold(holders: int, dropout_fraction: float) -> int:
    """Shares needed to rebuild a secret shared among ``holders`` of whom ``dropout_fraction`` may drop (> half)."""
    return holders - math.floor(dropout_fraction * holders)


def check_ring(quantization_range: int, weight_sum: int) -> None:
    """The weighted sum of quantised values must fit the ring (no wrap-around), else the mean is wrong."""
    if quantization_range * weight_sum >= 2**RING_BITS:
        raise ProtocolError(
            f"quantization-range {quantization_range} × total weight {weight_sum} does not fit 2^{RING_BITS}"
        )


def encode(
    update: np.ndarray,
    weight: int | Sequence[int],
    clip_range: float,
    quantization_range: int,
    sizes: Sequence[int] | None = None,
) -> np.ndarray:
    """What a client masks (``uint64``): per group, its weight × its segment's quantised values; then the weights.

    ``sizes`` cuts ``update`` into the groups' segments (default: one group,
    the whole update) and ``weight`` gives one weight per group. A client gives
    a group it is not in the weight 0, so that segment adds exactly 0 to the
    group's sum whatever it holds: one masked input carries one secure sum per
    group (:func:`decode_groups`).
    """
    weights = [weight] if isinstance(weight, int) else list(weight)
    sizes = [update.size] if sizes is None else list(sizes)
    if len(weights) != len(sizes) or sum(sizes) != update.size:
        raise ValueError(f"{len(weights)} weight(s) and segments {sizes} for an update of {update.size} values")
    quantized = quantize([np.asarray(update, dtype=np.float64)], clip_range, quantization_range)[0]
    weighted = quantized.astype(np.uint64).ravel() * np.repeat(np.array(weights, dtype=np.uint64), sizes)
    return np.concatenate([weighted, np.array(weights, dtype=np.uint64)])


def decode_groups(
    total: np.ndarray, sizes: Sequence[int], clip_range: float, quantization_range: int
) -> list[tuple[np.ndarray | None, int]]:
    """Per group of ``sizes``: its weighted mean update and weight sum, from the unmasked sum of :func:`encode`'s.

    A group no client in the sum belongs to has weight sum 0 and no mean (None).
    """
    if total.size != sum(sizes) + len(sizes):
        raise ProtocolError(f"a sum of {total.size} values for segments {list(sizes)} and their weights")
    weight_sums = [int(w) for w in total[total.size - len(sizes) :]]
    if not any(weight_sums):
        raise ProtocolError("the unmasked weight sum is 0")
    scale = 2 * clip_range / quantization_range
    out: list[tuple[np.ndarray | None, int]] = []
    offset = 0
    for size, weight_sum in zip(sizes, weight_sums, strict=True):
        segment, offset = total[offset : offset + size], offset + size
        if weight_sum:
            check_ring(quantization_range, weight_sum)
            out.append((segment.astype(np.float64) * (scale / weight_sum) - clip_range, weight_sum))
        else:
            out.append((None, 0))
    return out


def decode(total: np.ndarray, clip_range: float, quantization_range: int) -> tuple[np.ndarray, int]:
    """The weighted mean update and the weight sum, from the unmasked sum of one group's :func:`encode` vectors."""
    mean, weight_sum = decode_groups(total, [total.size - 1], clip_range, quantization_range)[0]
    assert mean is not None  # decode_groups refuses a zero weight sum
    return mean, weight_sum


def lay_out(
    update: np.ndarray, lengths: Sequence[int], groups: Sequence[int], sizes: Sequence[int], weight: int
) -> tuple[np.ndarray, list[int]]:
    """A client's flat update spread over the groups' segments, and its weight per group.

    The client's tensors (``lengths`` values each, in ``update``'s order) go, in
    order, to the segment of their group (``groups``, an index into ``sizes``);
    a group the client is not in gets zeros and weight 0. Each segment the
    client fills must come out at its size, else the server's layout and the
    client's tensors disagree (:class:`ProtocolError`).
    """
    if len(lengths) != len(groups) or sum(lengths) != update.size:
        raise ProtocolError(f"a layout of {len(groups)} group(s) for {len(lengths)} tensor(s) of {update.size} values")
    parts: list[list[np.ndarray]] = [[] for _ in sizes]
    offset = 0
    for length, group in zip(lengths, groups, strict=True):
        if not 0 <= group < len(sizes):
            raise ProtocolError(f"group {group} is not one of the {len(sizes)} group(s)")
        parts[group].append(update[offset : offset + length])
        offset += length
    segments, weights = [], []
    for group, (size, part) in enumerate(zip(sizes, parts, strict=True)):
        segment = np.concatenate(part) if part else np.zeros(size)
        if segment.size != size:
            raise ProtocolError(f"group {group}: this client's tensors hold {segment.size} values, expected {size}")
        segments.append(segment)
        weights.append(weight if part else 0)
    return np.concatenate(segments) if segments else np.zeros(0), weights


def _sign(own: int, other: int) -> np.uint64:
    """+1 or -1 (the ring's ``2^64 - 1``): the smaller index adds a pair's mask, the other subtracts it."""
    return np.uint64(1) if own < other else np.uint64(2**RING_BITS - 1)


def pairwise_mask(private: bytes, public: bytes, own: int, other: int, size: int) -> np.ndarray:
    """The mask ``own`` adds for its pair with ``other`` (the other adds its negative)."""
    return prg(agree(private, public, MASKING), size) * _sign(own, other)


# --- client --------------------------------------------------------------------------------------------------------


@dataclass
class ClientSecrets:
    """What a client keeps between the protocol's stages (never sent, except shares to their holders)."""

    index: int
    encryption_key: bytes  # X25519 private
    mask_key: bytes  # X25519 private
    threshold: int = 0
    peers: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # neighbour -> (encryption, mask) public
    seed: bytes = b""  # the self-mask seed b
    shares: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # whose -> (share of b, share of mask key)
    masked_with: list[int] = field(default_factory=list)  # neighbours whose shares arrived: the pairwise masks

    def to_bytes(self) -> bytes:
        """Serialised (for Flower's per-node ``context.state``)."""
        return json.dumps(
            {
                "index": self.index,
                "keys": [self.encryption_key.hex(), self.mask_key.hex()],
                "threshold": self.threshold,
                "peers": {str(j): [e.hex(), m.hex()] for j, (e, m) in self.peers.items()},
                "seed": self.seed.hex(),
                "shares": {str(j): [b.hex(), s.hex()] for j, (b, s) in self.shares.items()},
                "masked": self.masked_with,
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientSecrets:
        """The inverse of :meth:`to_bytes`."""
        raw = json.loads(data)
        return cls(
            raw["index"],
            bytes.fromhex(raw["keys"][0]),
            bytes.fromhex(raw["keys"][1]),
            raw["threshold"],
            {int(j): (bytes.fromhex(e), bytes.fromhex(m)) for j, (e, m) in raw["peers"].items()},
            bytes.fromhex(raw["seed"]),
            {int(j): (bytes.fromhex(b), bytes.fromhex(s)) for j, (b, s) in raw["shares"].items()},
            raw["masked"],
        )


def client_keys(index: int) -> tuple[ClientSecrets, bytes, bytes]:
    """Stage 1: fresh key pairs; the secrets to keep and the two public keys to send."""
    encryption_key, encryption_public = keypair()
    mask_key, mask_public = keypair()
    return ClientSecrets(index, encryption_key, mask_key), encryption_public, mask_public


def client_shares(
    secrets: ClientSecrets, peers: Mapping[int, tuple[bytes, bytes]], shares_needed: int
) -> tuple[dict[int, bytes], bytes]:
    """Stage 2: share ``b`` and the mask key among self and ``peers``; per peer its encrypted share, and b's hash."""
    holders = sorted({secrets.index, *peers})
    if not 1 <= shares_needed <= len(holders):
        raise ProtocolError(f"threshold {shares_needed} is not in 1..{len(holders)} (the share holders)")
    secrets.peers, secrets.threshold, secrets.seed = dict(peers), shares_needed, os.urandom(KEY_BYTES)
    seed_shares = create_shares(secrets.seed, shares_needed, len(holders))
    key_shares = create_shares(secrets.mask_key, shares_needed, len(holders))
    ciphertexts = {}
    for holder, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True):
        if holder == secrets.index:
            secrets.shares[holder] = (seed_share, key_share)
            continue
        key = fernet_key(agree(secrets.encryption_key, peers[holder][0], ENCRYPTION))
        plaintext = share_keys_plaintext_concat(secrets.index, holder, seed_share, key_share)
        ciphertexts[holder] = encrypt(key, plaintext)
    return ciphertexts, hashlib.sha256(secrets.seed).digest()


def client_receive(secrets: ClientSecrets, ciphertexts: Mapping[int, bytes]) -> dict[int, str]:
    """Stage 3, first half: decrypt the shares forwarded to this client; the senders whose share is bad, and why.

    Every sender counts as a neighbour that finished stage 2 and is masked with,
    good share or bad: the server knows the same list, so it can undo those masks.
    """
    rejected = {}
    for sender, ciphertext in ciphertexts.items():
        if sender not in secrets.peers:
            rejected[sender] = "is not a neighbour of this client"
            continue
        try:
            key = fernet_key(agree(secrets.encryption_key, secrets.peers[sender][0], ENCRYPTION))
            src, dst, seed_share, key_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
        except (InvalidToken, ProtocolError, ValueError, TypeError) as err:
            rejected[sender] = f"its share does not decrypt ({type(err).__name__})"
            continue
        if (src, dst) != (sender, secrets.index) or not seed_share or not key_share:
            rejected[sender] = f"its share is addressed {src}->{dst}, expected {sender}->{secrets.index}"
            continue
        secrets.shares[sender] = (seed_share, key_share)
    secrets.masked_with = sorted(j for j in ciphertexts if j in secrets.peers)
    return rejected


def client_mask(
    secrets: ClientSecrets,
    update: np.ndarray,
    weight: int | Sequence[int],
    clip_range: float,
    quantization_range: int,
    sizes: Sequence[int] | None = None,
) -> np.ndarray:
    """Stage 3, second half: the masked input, ``encode(update) + PRG(b) ± PRG(s_ij)`` modulo 2^64."""
    vector = encode(update, weight, clip_range, quantization_range, sizes)
    vector += prg(secrets.seed, vector.size)
    for peer in secrets.masked_with:
        vector += pairwise_mask(secrets.mask_key, secrets.peers[peer][1], secrets.index, peer, vector.size)
    return vector


def client_unmask(
    secrets: ClientSecrets, alive: Sequence[int], dropped: Sequence[int]
) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Stage 4: this client's shares of the ``b`` of each ``alive`` client and the mask key of each ``dropped`` one.

    Refuses a request naming a client as both: with both secrets the server could unmask it alone.
    """
    if both := set(alive) & set(dropped):
        raise ProtocolError(f"the server asked for both secrets of client(s) {sorted(both)}")
    if secrets.index in dropped:
        raise ProtocolError("the server asked for this client's own mask key")
    seeds = {j: secrets.shares[j][0] for j in alive if j in secrets.shares}
    keys = {j: secrets.shares[j][1] for j in dropped if j in secrets.shares}
    return seeds, keys


# --- server --------------------------------------------------------------------------------------------------------


@dataclass
class ServerSession:
    """The server's side of one round of the protocol over clients ``1..n``.

    Call in order: :meth:`add_keys` per client, :meth:`share_requests`,
    :meth:`add_shares` per client, :meth:`forwards`, :meth:`unmask_request` with
    the masked inputs, :meth:`unmask`. Each ``add_*`` raises :class:`ProtocolError`
    for a malformed message; that client then counts as dropped.
    """

    clients: list[int]
    num_shares: int
    dropout_fraction: float
    seed: int
    graph: dict[int, list[int]] = field(init=False)
    threshold: int = field(init=False)
    public: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # stage 1: who sent keys
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict)  # stage 2: sender -> holder -> share
    commitments: dict[int, bytes] = field(default_factory=dict)
    alive: list[int] = field(default_factory=list)  # stage 3: whose masked input counts
    dropped: list[int] = field(default_factory=list)  # shared keys, but no (valid) masked input
    excluded: dict[int, str] = field(default_factory=dict)  # client -> why it was excluded

    def __post_init__(self) -> None:
        self.graph = neighbours(self.clients, self.num_shares, self.seed)
        degree = len(next(iter(self.graph.values()), []))
        self.threshold = threshold(degree + 1, self.dropout_fraction)

    def add_keys(self, client: int, encryption_public: object, mask_public: object) -> None:
        """Stage 1: a client's public keys."""
        for key in (encryption_public, mask_public):
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise ProtocolError(f"public keys must be {KEY_BYTES} bytes each")
        if encryption_public == mask_public:
            raise ProtocolError("the encryption and mask public keys are the same")
        self.public[client] = (encryption_public, mask_public)

    def share_requests(self) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """Stage 2's instructions: per client that sent keys, its neighbours' public keys."""
        return {i: {j: self.public[j] for j in self.graph[i] if j in self.public} for i in self.public}

    def add_shares(self, client: int, ciphertexts: Mapping[int, object], commitment: object) -> None:
        """Stage 2: a client's encrypted shares, one per neighbour that sent keys, and its commitment to ``b``."""
        expected = {j for j in self.graph[client] if j in self.public}
        if set(ciphertexts) != expected:
            raise ProtocolError(f"shares addressed to {sorted(ciphertexts)}, expected neighbours {sorted(expected)}")
        if not all(isinstance(c, bytes) and c for c in ciphertexts.values()):
            raise ProtocolError("a share is not a non-empty byte string")
        if not isinstance(commitment, bytes) or len(commitment) != hashlib.sha256().digest_size:
            raise ProtocolError("the commitment to the self-mask seed is not a SHA-256 digest")
        self.ciphertexts[client] = dict(ciphertexts)  # type: ignore[arg-type]
        self.commitments[client] = commitment

    def forwards(self) -> dict[int, dict[int, bytes]]:
        """Stage 3's instructions: per client that sent shares, the shares its neighbours sent it."""
        senders = self.ciphertexts
        return {i: {j: senders[j][i] for j in self.graph[i] if j in senders} for i in senders}

    def unmask_request(
        self, masked: Mapping[int, np.ndarray], rejected: Mapping[int, Mapping[int, str]]
    ) -> tuple[list[int], list[int]]:
        """Stage 4's instruction from stage 3's masked inputs and the bad shares clients reported: (alive, dropped).

        A client reported for a bad share is excluded (its input is dropped, its
        masks removed through its key), so no honest client's work is lost.
        """
        for reporter, bad in rejected.items():
            for sender, reason in bad.items():
                if sender in self.ciphertexts and sender not in self.excluded:
                    self.excluded[sender] = f"client {reporter} says {reason}"
        self.alive = sorted(i for i in masked if i in self.ciphertexts and i not in self.excluded)
        self.dropped = sorted(set(self.ciphertexts) - set(self.alive))
        if len(self.alive) < self.threshold:
            raise ProtocolError(
                f"{len(self.alive)} masked input(s), fewer than the threshold {self.threshold}: too many dropped out"
            )
        return self.alive, self.dropped

    def unmask(
        self,
        masked: Mapping[int, np.ndarray],
        shares: Mapping[int, tuple[Mapping[int, bytes], Mapping[int, bytes]]],
    ) -> np.ndarray:
        """The unmasked sum of the alive clients' inputs, from stage 4's shares (holder -> (b shares, key shares))."""
        size = len(masked[self.alive[0]])
        total = np.zeros(size, dtype=np.uint64)
        for client in self.alive:
            total += masked[client]
        for client in self.alive:
            seed = self._rebuild(client, [s[0].get(client) for s in shares.values()], "self-mask seed")
            if hashlib.sha256(seed).digest() != self.commitments[client]:
                raise ProtocolError(f"client {client}'s rebuilt self-mask seed does not match its commitment")
            total -= prg(seed, size)
        for client in self.dropped:
            key = self._rebuild(client, [s[1].get(client) for s in shares.values()], "mask key")
            if len(key) != KEY_BYTES or public_of(key) != self.public[client][1]:
                raise ProtocolError(f"client {client}'s rebuilt mask key does not match its public key")
            for other in self.alive:
                if client in self.graph[other]:  # ``other`` masked with ``client``: remove what it added
                    total -= pairwise_mask(key, self.public[other][1], other, client, size)
        return total

    def _rebuild(self, client: int, shares: list[bytes | None], what: str) -> bytes:
        found = [s for s in shares if isinstance(s, bytes)]
        if len(found) < self.threshold:
            raise ProtocolError(f"{len(found)} share(s) of client {client}'s {what}, fewer than {self.threshold}")
        try:  # any threshold of them determine the secret; the caller checks it against its commitment or key
            return combine_shares(found[: self.threshold])
        except (ValueError, IndexError) as err:
            raise ProtocolError(f"client {client}'s {what} cannot be rebuilt from its shares: {err}") from err
