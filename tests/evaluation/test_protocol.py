"""The paper's evaluation protocol: largest face for one subject, marked random scorers, any pipeline
under the same prompts and seeds, the paper's model ids, class words of the CelebA benchmark layout."""

import json
import shutil
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from PIL import Image

from fc_pipeline.evaluation.faces import FaceScorer, TorchFaceNetEmbedder, identity_score
from fc_pipeline.evaluation.prompt_consistency import RANDOM_SCORER_NOTE, PromptConsistency
from fc_pipeline.evaluation.prompts import benchmark_cases, load_prompt_set
from fc_pipeline.evaluation.report import parse_markdown_table
from fc_pipeline.evaluation.runner import TEXT_ONLY_METHOD, EvaluationConfig, run_evaluation
from fc_pipeline.evaluation.subjects import load_subjects
from fc_pipeline.profiles import SUBJECT_MARKER, get_profile

BIG, SMALL = "shea_whigham", "paul_rudd"  # person B (large face), person A (small face)


@pytest.fixture(scope="module")
def composite(subject_photos) -> Image.Image:
    """A large face of person B and, beside it, a small face of person A."""
    big, small = subject_photos[BIG], subject_photos[SMALL]
    small = small.resize((small.width // 4, small.height // 4), Image.Resampling.BICUBIC)
    image = Image.new("RGB", (big.width + small.width, big.height), "white")
    image.paste(big, (0, 0))
    image.paste(small, (big.width, big.height - small.height))
    return image


class FakePipeline:
    """A pipeline object under the protocol: always returns the same image, records every call."""

    def __init__(self, image: Image.Image):
        self.image, self.calls = image, []

    def __call__(self, prompt, subject_images, alpha, num_images_per_prompt, generator, **kwargs):
        self.calls.append(
            dict(prompt=prompt, subjects=len(subject_images), alpha=alpha, n=num_images_per_prompt, generator=generator)
        )
        return SimpleNamespace(images=[self.image.copy() for _ in range(num_images_per_prompt)])


class StubPromptScorer:
    """A non-random prompt scorer with a known answer."""

    note, description = None, "stub"

    def score(self, images, prompts):
        return [25.0] * len(images)


def _subjects(faces_dir, tmp_path, names: dict[str, str]):
    """A subjects folder: {folder name: shared photo folder}, one image each."""
    for folder, person in names.items():
        (tmp_path / folder).mkdir(parents=True)
        shutil.copy(faces_dir / "subjects" / person / "1.jpg", tmp_path / folder / "1.jpg")
    return tmp_path


def test_single_subject_identity_is_the_largest_face(face_scorer, subject_faces, composite):
    generated = face_scorer.faces(composite)
    assert len(generated) == 2
    a_vs_b = face_scorer.identity_score(subject_faces[SMALL], subject_faces[BIG])
    assert a_vs_b < 0.5
    # the large face is B's: the score is sim(A, B), although A's own (small) face is in the image
    assert face_scorer.identity_score(subject_faces[SMALL], generated) == pytest.approx(a_vs_b, abs=0.02)
    assert identity_score(composite, composite, face_scorer) == pytest.approx(1.0, abs=1e-5)
    assert face_scorer.multi_identity([subject_faces[SMALL]], generated).score > 0.9  # what greedy would give


def test_runner_scores_any_pipeline_by_the_protocol(
    faces_dir, tmp_path, face_scorer, prompt_scorer, subject_faces, composite
):
    subjects = _subjects(faces_dir, tmp_path / "subjects", {SMALL: SMALL, BIG: BIG})
    fake = FakePipeline(composite)
    config = EvaluationConfig(
        prompt_sets=("single", "multi"), images_per_prompt=2, alphas=(0.7,), max_prompts=1, seed=3
    )
    result = run_evaluation(
        {"fake": fake}, subjects, tmp_path / "out", config, faces=face_scorer, prompt_scorer=prompt_scorer
    )
    rows = pq.read_table(tmp_path / "out" / "scores.parquet").to_pylist()
    # 1 single prompt × 2 subjects + 1 multi prompt × 1 pair = 3 cases, × (text only, α = 0.7) × 2 images
    assert len(rows) == 12 == result["images"]
    a_vs_b = face_scorer.identity_score(subject_faces[SMALL], subject_faces[BIG])
    for row in rows:
        expected = {
            ("single", (SMALL,)): a_vs_b,  # the largest face (B's) against A
            ("single", (BIG,)): 1.0,  # B's own photo is the largest face
        }.get((row["setting"], tuple(row["subjects"])))
        if expected is not None:
            assert row["identity"] == pytest.approx(expected, abs=0.02), row
        else:  # multi: greedy matching, minimum over subjects — both people are there
            assert row["identity"] > 0.9 and row["margin"] > 0.4
        assert row["method"] == (TEXT_ONLY_METHOD if row["alpha"] == 0 else "FakePipeline")
        assert row["seed"] in (3, 4)
    # every call follows the protocol: markers only with subject images, one seeded generator per image
    warmup, *calls = fake.calls
    assert warmup["subjects"] == 0 and len(calls) == 6
    for call in calls:
        assert call["n"] == 2 and [g.initial_seed() for g in call["generator"]] == [3, 4]
        assert call["subjects"] == (0 if call["alpha"] == 0 else call["prompt"].count(SUBJECT_MARKER))
        assert (SUBJECT_MARKER in call["prompt"]) == (call["alpha"] > 0)
    assert {c["alpha"] for c in calls} == {0.0, 0.7}


def test_random_prompt_scorer_is_marked_everywhere(faces_dir, tmp_path, face_scorer, prompt_scorer, composite):
    subjects = _subjects(faces_dir, tmp_path / "subjects", {SMALL: SMALL})
    config = EvaluationConfig(images_per_prompt=1, max_prompts=1, text_only_baseline=False)
    marked = run_evaluation(
        {"fake": FakePipeline(composite)},
        subjects,
        tmp_path / "tiny",
        config,
        faces=face_scorer,
        prompt_scorer=prompt_scorer,
    )
    assert prompt_scorer.note == RANDOM_SCORER_NOTE
    assert marked["notes"] == {"prompt_consistency": RANDOM_SCORER_NOTE}
    assert marked["headline"]["single"]["prompt_consistency_note"] == RANDOM_SCORER_NOTE
    saved = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert saved["notes"] == marked["notes"] and RANDOM_SCORER_NOTE in saved["scorers"]["prompt_consistency"]
    assert saved["scorers"]["identity"] == "MTCNN + FaceNet casia-webface-opencv"  # identity: the real FaceNet
    markdown = (tmp_path / "tiny" / "report.md").read_text()
    summary = parse_markdown_table(markdown.split("## Summary", 1)[1])
    assert f"prompt_consistency ({RANDOM_SCORER_NOTE})" in summary[0] and "identity_pct" in summary[0]
    assert f"prompt_consistency ({RANDOM_SCORER_NOTE})" in (tmp_path / "tiny" / "report.html").read_text()

    plain = run_evaluation(
        {"fake": FakePipeline(composite)},
        subjects,
        tmp_path / "real",
        config,
        faces=face_scorer,
        prompt_scorer=StubPromptScorer(),
    )
    assert plain["notes"] == {} and "prompt_consistency_note" not in plain["headline"]["single"]
    assert plain["headline"]["single"]["prompt_consistency"] == 25.0
    assert RANDOM_SCORER_NOTE not in (tmp_path / "real" / "report.md").read_text()


def test_paper_clip_missing_fails_with_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download fc-pipeline-tests/no-such-clip"):
        PromptConsistency(get_profile("paper", prompt_clip="fc-pipeline-tests/no-such-clip"))
    with pytest.raises(FileNotFoundError, match="hf download openai/clip-vit-large-patch14 --local-dir /"):
        PromptConsistency(get_profile("paper", prompt_clip=str(tmp_path / "missing")))


def test_paper_profile_model_ids():
    paper = get_profile("paper")
    assert paper.sbert == "sentence-transformers/stsb-mpnet-base-v2"
    assert paper.captioner == "Salesforce/blip2-opt-6.7b-coco"
    assert paper.segmenter == "facebook/mask2former-swin-large-coco-panoptic"
    assert (paper.matcher_clip, paper.matcher_clip_pretrained) == ("ViT-H-14", "laion2b_s32b_b79k")
    assert paper.stable_diffusion == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # mirror of runwayml's
    assert paper.image_encoder == paper.prompt_clip == "openai/clip-vit-large-patch14"
    assert paper.facenet == "vggface2"


def test_vggface2_faces_are_cropped_without_margin(tmp_path):
    from facenet_pytorch import InceptionResnetV1
    from safetensors.torch import save_file

    weights = tmp_path / "facenet.safetensors"
    save_file(InceptionResnetV1(pretrained=None).state_dict(), weights)
    scorer = FaceScorer(embedder=TorchFaceNetEmbedder(weights))
    assert scorer.detector.mtcnn.margin == 0  # the official evaluation's MTCNN(margin=0)


def test_celeba_benchmark_layout_and_class_words(faces_dir, tmp_path, face_scorer, composite):
    # the paper's layout: one folder per CelebA test identity, one image each, no subjects.json
    celeba = _subjects(faces_dir, tmp_path / "celeba", {"000001": "paul_rudd", "000612": "angelina_jolie"})
    subjects = load_subjects(celeba)
    assert [(s.name, s.class_word) for s in subjects] == [("000001", "man"), ("000612", "woman")]
    case = benchmark_cases(subjects, load_prompt_set("multi"), max_prompts=1)[0]
    assert case.prompt == "a man <|image|> and a woman <|image|> on a beach at sunset"
    run_evaluation(
        {"fake": FakePipeline(composite)},
        celeba,
        tmp_path / "out",
        EvaluationConfig(images_per_prompt=1, max_prompts=1, text_only_baseline=False),
        faces=face_scorer,
        prompt_scorer=StubPromptScorer(),
    )
    prompts = {r["case_id"]: r["prompt"] for r in pq.read_table(tmp_path / "out" / "scores.parquet").to_pylist()}
    assert prompts == {
        "p00-000001": "a photo of a man <|image|> on a beach at sunset",
        "p00-000612": "a photo of a woman <|image|> on a beach at sunset",
    }

    # subjects.json gives the class words (and overrides the built-in ones)
    (celeba / "subjects.json").write_text(json.dumps({"000001": "boy"}))
    assert [s.class_word for s in load_subjects(celeba)] == ["boy", "woman"]
    named = _subjects(faces_dir, tmp_path / "named", {"kate": "kate_siegel", "paul": "paul_rudd"})
    assert {s.class_word for s in load_subjects(named)} == {"person"}
    (named / "subjects.json").write_text(json.dumps({"kate": "woman", "paul": "man"}))
    case = benchmark_cases(load_subjects(named), load_prompt_set("single"), max_prompts=1)[0]
    assert case.prompt == "a photo of a woman <|image|> on a beach at sunset"


def test_generic_pipeline_needs_to_be_callable(tmp_path, demo_subjects, face_scorer):
    with pytest.raises(ValueError, match="cannot evaluate a int"):
        run_evaluation({"x": 3}, demo_subjects, tmp_path, faces=face_scorer, prompt_scorer=StubPromptScorer())


def test_pipeline_by_reference(tmp_path, monkeypatch, demo_subjects, face_scorer):
    # how the CLI (--checkpoint) and the Dagster config name another method: "package.module:factory"
    (tmp_path / "other_method.py").write_text(
        "from types import SimpleNamespace\n"
        "from PIL import Image\n\n"
        "class Gray:\n"
        "    method_name = 'gray baseline'\n\n"
        "    def __call__(self, prompt, subject_images, alpha, num_images_per_prompt, generator, **kwargs):\n"
        "        return SimpleNamespace(images=[Image.new('RGB', (32, 32), 'gray')] * num_images_per_prompt)\n\n"
        "def build():\n"
        "    return Gray()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = EvaluationConfig(images_per_prompt=1, max_prompts=1, max_subject_groups=1, text_only_baseline=False)
    result = run_evaluation(
        "other_method:build",
        demo_subjects,
        tmp_path / "out",
        config,
        faces=face_scorer,
        prompt_scorer=StubPromptScorer(),
    )
    assert [(r["checkpoint"], r["method"], r["identity_pct"]) for r in result["summary"]] == [
        ("build", "gray baseline", 0.0)  # no face in a gray image
    ]
    with pytest.raises(ValueError, match="cannot import 'missing' from 'other_method'"):
        run_evaluation(
            "other_method:missing",
            demo_subjects,
            tmp_path / "bad",
            config,
            faces=face_scorer,
            prompt_scorer=StubPromptScorer(),
        )


def test_scheduler_swap_reaches_the_plain_sd_baseline_and_names_a_pipeline_without_one(
    tiny_checkpoint, demo_subjects, tmp_path, face_scorer, composite
):
    from diffusers import DDIMScheduler

    from fc_pipeline.evaluation.baselines import PlainStableDiffusion
    from fc_pipeline.schedulers import with_scheduler

    plain = with_scheduler(PlainStableDiffusion.from_pretrained(tiny_checkpoint), "ddim")
    assert isinstance(plain.pipe.scheduler, DDIMScheduler)
    with pytest.raises(ValueError, match="the pipeline 'fake' has no .scheduler"):
        run_evaluation(
            {"fake": FakePipeline(composite)},
            demo_subjects,
            tmp_path,
            EvaluationConfig(max_prompts=1, scheduler="ddim"),
            faces=face_scorer,
            prompt_scorer=StubPromptScorer(),
        )
