"""Which KV heads are retrieval heads and which are streaming heads, per layer.

A profile is a small JSON file written by `needle calibrate`: a score per (layer, KV head) (higher =
the head looks further back for the needle) and the resulting streaming flags. The split can be redrawn
at load time from the scores with --streaming-ratio, ranking heads across all layers (as LServe does).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class HeadProfile:
    model: str
    scores: list[list[float]]  # [num_layers][num_kv_heads]
    streaming: list[list[bool]]  # [num_layers][num_kv_heads]
    identity: dict = field(default_factory=dict)  # the model's ModelConfig.identity, for matching
    # Sliding-window layers: they read only their window whatever the profile, so they are left out of
    # the streaming/retrieval split (never streaming, not counted in the ratio).
    local_layers: list[int] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.scores)

    @property
    def num_kv_heads(self) -> int:
        return len(self.scores[0]) if self.scores else 0

    @classmethod
    def all_retrieval(cls, model: str, num_layers: int, num_kv_heads: int) -> HeadProfile:
        return cls(model, [[1.0] * num_kv_heads for _ in range(num_layers)],
                   [[False] * num_kv_heads for _ in range(num_layers)])

    @classmethod
    def from_scores(cls, model: str, scores: list[list[float]], streaming_ratio: float,
                    identity: dict | None = None,
                    local_layers: list[int] | tuple[int, ...] = ()) -> HeadProfile:
        """The round(ratio * heads) lowest-scoring heads, ranked over all global layers, become streaming
        heads."""
        if not 0.0 <= streaming_ratio <= 1.0:
            raise ValueError(f"streaming ratio must lie in [0, 1], got {streaming_ratio}")
        flat = [(s, layer, head) for layer, row in enumerate(scores) if layer not in local_layers
                for head, s in enumerate(row)]
        num_streaming = round(streaming_ratio * len(flat))
        streaming = [[False] * len(row) for row in scores]
        for _, layer, head in sorted(flat, key=lambda t: t[0])[:num_streaming]:
            streaming[layer][head] = True
        return cls(model, [list(map(float, row)) for row in scores], streaming, dict(identity or {}),
                   sorted(local_layers))

    def with_streaming_ratio(self, ratio: float) -> HeadProfile:
        return HeadProfile.from_scores(self.model, self.scores, ratio, self.identity, self.local_layers)

    def shard(self, rank: int, size: int) -> HeadProfile:
        """The KV heads tensor-parallel rank `rank` of `size` holds (its contiguous 1/size of each layer's),
        numbered from 0 as that rank's attention sees them."""
        n = self.num_kv_heads // size
        heads = slice(rank * n, (rank + 1) * n)
        return HeadProfile(self.model, [row[heads] for row in self.scores],
                           [row[heads] for row in self.streaming], self.identity, self.local_layers)

    @property
    def streaming_ratio(self) -> float:
        flags = [f for layer, row in enumerate(self.streaming) if layer not in self.local_layers for f in row]
        return sum(flags) / max(1, len(flags))

    def save(self, path: str | Path) -> None:
        data = {"model": self.model, "identity": self.identity, "num_layers": self.num_layers,
                "num_kv_heads": self.num_kv_heads, "streaming_ratio": self.streaming_ratio,
                "scores": self.scores, "streaming": self.streaming}
        if self.local_layers:
            data["local_layers"] = self.local_layers
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> HeadProfile:
        data = json.loads(Path(path).read_text())
        profile = cls(data["model"], data["scores"], [[bool(f) for f in row] for row in data["streaming"]],
                      data.get("identity") or {}, data.get("local_layers", []))
        if any(len(row) != profile.num_kv_heads for row in profile.scores + profile.streaming) or \
                len(profile.streaming) != profile.num_layers:
            raise ValueError(f"{path}: scores and streaming flags must both be [num_layers][num_kv_heads]")
        return profile


def fits(profile_identity: dict, identity: dict) -> bool:
    """Same architecture and shape; the names must agree only where both sides have one."""
    if not profile_identity:
        return False
    for key, want in identity.items():
        have = profile_identity.get(key)
        if key == "name" and (have is None or want is None):
            continue
        if have != want:
            return False
    return True


def bundled_profile(identity: dict) -> Path | None:
    """The shipped profile (attention/profiles/*.json) made for this model, found by its identity."""
    for path in sorted(Path(str(resources.files("needle.attention") / "profiles")).glob("*.json")):
        if fits(json.loads(path.read_text()).get("identity") or {}, identity):
            return path
    return None


def resolve_profile(path: str | None, model_name: str, identity: dict, num_layers: int, num_kv_heads: int,
                    streaming_ratio: float | None) -> HeadProfile:
    """The profile to run with: `path`, else the shipped one that fits the model, else all-retrieval
    (with a warning); then the streaming ratio override, if any."""
    candidate = Path(path) if path else bundled_profile(identity)
    if candidate is not None and candidate.is_file():
        profile = HeadProfile.load(candidate)
        if (profile.num_layers, profile.num_kv_heads) != (num_layers, num_kv_heads):
            raise ValueError(f"head profile {candidate} is for {profile.num_layers} layers x "
                             f"{profile.num_kv_heads} KV heads, the model has {num_layers} x {num_kv_heads}")
        log.info("head profile %s (%.0f%% streaming heads)", candidate, 100 * profile.streaming_ratio)
    elif path:
        raise FileNotFoundError(f"head profile {path} does not exist")
    else:
        log.warning("no head profile for %s (run `needle calibrate`); every head is a retrieval head",
                    model_name)
        profile = HeadProfile.all_retrieval(model_name, num_layers, num_kv_heads)
    return profile if streaming_ratio is None else profile.with_streaming_ratio(streaming_ratio)
