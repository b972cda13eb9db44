"""Identity metrics on real photos (../shared/testdata/faces) with the offline CASIA-WebFace FaceNet."""

import itertools

import numpy as np
import pytest
from PIL import Image, ImageOps

from fc_pipeline.evaluation.faces import (
    TorchFaceNetEmbedder,
    face_embedder,
    greedy_assignment,
    hungarian_assignment,
    match_subjects,
    resolve_facenet_weights,
)
from fc_pipeline.profiles import get_profile


def mirrored_and_rescaled(image: Image.Image) -> Image.Image:
    """The same photo flipped left-right and downscaled by half."""
    return ImageOps.mirror(image).resize((image.width // 2, image.height // 2), Image.Resampling.BICUBIC)


def test_mtcnn_finds_the_faces_of_the_readme(face_scorer, faces_dir, subject_faces):
    group = face_scorer.faces(Image.open(faces_dir / "multiface.jpg"))
    assert len(group) == 7
    assert (group.probs >= 0.998).sum() == 6
    assert group.probs.min() == pytest.approx(0.77, abs=0.02)
    areas = (group.boxes[:, 2] - group.boxes[:, 0]) * (group.boxes[:, 3] - group.boxes[:, 1])
    assert list(areas) == sorted(areas, reverse=True)  # largest face first
    assert group.embeddings.shape == (7, 512)
    np.testing.assert_allclose(np.linalg.norm(group.embeddings, axis=1), 1.0, atol=1e-5)
    for name, faces in subject_faces.items():
        assert len(faces) == 1, name
        assert faces.probs[0] > 0.99


def test_identity_of_an_image_with_itself_is_one(face_scorer, subject_faces):
    for faces in subject_faces.values():
        assert face_scorer.identity_score(faces, faces) == pytest.approx(1.0, abs=1e-5)


def test_same_person_scores_far_above_different_people(face_scorer, subject_photos, subject_faces):
    faces = subject_faces
    same = [face_scorer.identity_score(faces[n], mirrored_and_rescaled(p)) for n, p in subject_photos.items()]
    different = [face_scorer.identity_score(faces[a], faces[b]) for a, b in itertools.combinations(faces, 2)]
    assert min(same) >= 0.9, same  # measured: 0.92–0.96
    assert max(different) <= 0.55, different  # measured: 0.07–0.51
    assert min(same) - max(different) > 0.35


def test_no_face_scores_zero(face_scorer, subject_faces):
    blank = face_scorer.faces(Image.new("RGB", (256, 256), (128, 128, 128)))
    photo = subject_faces["paul_rudd"]
    assert len(blank) == 0
    assert face_scorer.identity_score(photo, blank) == 0.0
    assert face_scorer.identity_score(blank, photo) == 0.0
    assert face_scorer.multi_identity([photo, photo], blank).score == 0.0


def test_multi_identity_on_a_composed_two_person_image(face_scorer, subject_photos, subject_faces):
    left, right = subject_photos["angelina_jolie"], subject_photos["paul_rudd"]
    pair = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
    pair.paste(left, (0, 0))
    pair.paste(right, (left.width, 0))
    pair = face_scorer.faces(pair)
    both = face_scorer.multi_identity([subject_faces["paul_rudd"], subject_faces["angelina_jolie"]], pair)
    assert both.similarity.shape == (2, 2)
    assert both.score > 0.9  # both present: each matched to itself
    assert all(m > 0.5 for m in both.margin)  # no blending between very different faces
    missing = face_scorer.multi_identity([subject_faces["angelina_jolie"], subject_faces["kate_siegel"]], pair)
    assert missing.scores[0] > 0.9
    assert missing.score == pytest.approx(missing.scores[1]) and missing.score < 0.55  # min rule


def test_greedy_matching_and_min_rule_on_a_known_case():
    similarity = np.array([[0.9, 0.8], [0.7, 0.1]], np.float32)
    assert greedy_assignment(similarity) == [0, 1]
    assert hungarian_assignment(similarity) == [1, 0]  # max total 1.5 > 1.0: the two methods differ
    greedy = match_subjects(similarity, "greedy")
    assert greedy.scores == pytest.approx([0.9, 0.1]) and greedy.score == pytest.approx(0.1)
    assert greedy.other_similarity == pytest.approx([0.7, 0.8])
    assert greedy.margin == pytest.approx([0.2, -0.7])  # subject 1's face looks more like subject 0
    hungarian = match_subjects(similarity, "hungarian")
    assert hungarian.scores == pytest.approx([0.8, 0.7]) and hungarian.score == pytest.approx(0.7)


def test_unmatched_subject_scores_zero():
    result = match_subjects(np.array([[0.6], [0.8]], np.float32))
    assert result.assignment == [-1, 0]
    assert result.scores == pytest.approx([0.0, 0.8]) and result.score == 0.0
    assert match_subjects(np.zeros((2, 0), np.float32)).score == 0.0
    with pytest.raises(ValueError, match="unknown matching method"):
        match_subjects(np.eye(2), "random")


def test_paper_facenet_needs_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        resolve_facenet_weights("vggface2")
    with pytest.raises(FileNotFoundError, match="no such file"):
        face_embedder(get_profile("paper", facenet=str(tmp_path / "missing.pt")))


def test_torch_facenet_loads_a_local_safetensors_file(tmp_path):
    from facenet_pytorch import InceptionResnetV1
    from safetensors.torch import save_file

    weights = tmp_path / "facenet.safetensors"
    save_file(InceptionResnetV1(pretrained=None).state_dict(), weights)
    embedder = face_embedder(get_profile("paper", facenet=str(weights)))
    assert isinstance(embedder, TorchFaceNetEmbedder)
    import torch

    embeddings = embedder.embed(torch.rand(1, 3, 160, 160) * 255)
    assert embeddings.shape == (1, 512)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
