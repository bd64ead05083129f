"""``python main.py serve`` on a 1-step demo model and its predicted collection: the JSON API through
the ASGI test client, checked against float64 brute-force ranking of the model's own embeddings, the
refusals of bad input, the audio folder's fence, and the page in headless chromium."""

import io
import json
import os
import select
import shutil
import socket
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from lightning_modules.tools.encoder import EmbeddingModel  # noqa: E402
from lightning_modules.tools.search import ids_path  # noqa: E402
from lightning_modules.tools.serve import Collection, RetrievalService, app_from_args, create_app  # noqa: E402
from main import main  # noqa: E402
from tests.browser import chromium, have_chromium, running_server  # noqa: E402

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-step demo fit, its predict output (12 clips) and its export."""
    root = tmp_path_factory.mktemp("serve")
    common = ["--config", CONFIG, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
              "--data.init_args.root", str(root / "data"), "--data.init_args.num_train", "32",
              "--data.init_args.num_val", "4", "--data.init_args.num_test", "12",
              "--data.init_args.num_hard_pairs", "0"]
    fit = main(["fit", *common, "--trainer.max_steps", "1", "--test_after_fit", "false"])
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    predict = main(["predict", *common, "--ckpt_path", str(ckpt), "--writer.output_dir", str(root / "collection")])
    embeddings = root / "collection" / "embeddings.safetensors"
    model = EmbeddingModel.from_checkpoint(ckpt)
    export = model.save_pretrained(root / "export")
    with safe_open(str(embeddings), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    ids = json.loads(ids_path(embeddings).read_text())
    return SimpleNamespace(root=root, ckpt=ckpt, embeddings=embeddings, export=export, model=model,
                           tensors=tensors, ids=ids, policy=predict.datamodule.eval_policy)


@pytest.fixture(scope="module")
def client(run):
    service = RetrievalService(run.model, Collection.load(run.embeddings), max_seconds=run.policy.max_seconds)
    return TestClient(create_app(service))


def brute_force(query: torch.Tensor, corpus: torch.Tensor, k: int) -> tuple[list[int], np.ndarray]:
    """Top-k rows by float64 dot product; ties by row order (a stable sort)."""
    scores = (query.double() @ corpus.double().T)[0].numpy()
    order = np.argsort(-scores, kind="stable")[:k]
    return order.tolist(), scores[order]


def clip_captions(run) -> dict[str, list[str]]:
    found = {clip: [] for clip in run.ids["audio"]["ids"]}
    for caption_id, text in zip(run.ids["text"]["ids"], run.ids["text"]["texts"]):
        found[caption_id.rsplit("#", 1)[0]].append(text)
    return found


def test_text_query_ranks_clips_like_brute_force(run, client):
    clip_ids = run.ids["audio"]["ids"]
    caption, owner = run.ids["text"]["texts"][7], run.ids["text"]["ids"][7].rsplit("#", 1)[0]
    answer = client.get("/api/search", params={"q": f"  {caption.upper()} ", "k": 5})
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    rows, scores = brute_force(run.model.encode(text=[f"  {caption.upper()} "]), run.tensors["audio"], 5)
    results = answer["results"]
    assert answer["target"] == "audio"
    assert [r["clip"] for r in results] == [clip_ids[i] for i in rows]
    np.testing.assert_allclose([r["score"] for r in results], scores, rtol=1e-5, atol=1e-6)
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    captions = clip_captions(run)
    assert all(r["captions"] == captions[r["clip"]] for r in results)
    assert all(r["audio_url"] == f"/audio/{r['clip']}" for r in results)
    # The query is a collection caption (up to case and spacing): its clip is the one relevant result.
    assert answer["relevant_total"] == 1
    assert [r["relevant"] for r in results] == [r["clip"] == owner for r in results]

    # A text that is no caption of the collection: relevance unknown.
    free = client.get("/api/search", params={"q": "a dog barks at the mail carrier"}).json()
    assert free["relevant_total"] is None and len(free["results"]) == 10
    assert all(r["relevant"] is None for r in free["results"])


def test_clip_query_reembeds_the_clip_and_marks_its_captions(run, client):
    clip_ids, caption_ids = run.ids["audio"]["ids"], run.ids["text"]["ids"]
    clip = clip_ids[3]
    answer = client.get("/api/search", params={"clip": clip, "k": 8}).json()
    query = run.model.encode(audio=[run.ids["audio"]["paths"][3]], max_seconds=run.policy.max_seconds)
    # Re-embedded from its file with the evaluation crop, the clip is the row predict wrote.
    torch.testing.assert_close(query[0], run.tensors["audio"][3], atol=1e-5, rtol=0)
    rows, scores = brute_force(query, run.tensors["text"], 8)
    results = answer["results"]
    assert answer["target"] == "text" and answer["query"]["clip"] == clip
    assert [r["caption_id"] for r in results] == [caption_ids[i] for i in rows]
    assert [r["caption"] for r in results] == [run.ids["text"]["texts"][i] for i in rows]
    np.testing.assert_allclose([r["score"] for r in results], scores, rtol=1e-5, atol=1e-6)
    assert [r["relevant"] for r in results] == [cid.rsplit("#", 1)[0] == clip for cid in
                                                [r["caption_id"] for r in results]]
    assert answer["relevant_total"] == sum(cid.rsplit("#", 1)[0] == clip for cid in caption_ids)
    assert all(r["clip"] == r["caption_id"].rsplit("#", 1)[0] for r in results)


def test_upload_is_decoded_resampled_and_ranked(run, client):
    rate = 44100
    t = np.arange(int(1.5 * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 660 * t) * (t < 0.7) + 0.2 * np.sin(2 * np.pi * (300 + 400 * t) * t)).astype(
        np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format="FLAC")
    answer = client.post("/api/search", files={"audio": ("tone.flac", buffer.getvalue(), "audio/flac")},
                         data={"k": "6"})
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    query = run.model.encode(audio=[wave], sampling_rate=rate, max_seconds=run.policy.max_seconds)
    rows, scores = brute_force(query, run.tensors["text"], 6)
    assert [r["caption_id"] for r in answer["results"]] == [run.ids["text"]["ids"][i] for i in rows]
    np.testing.assert_allclose([r["score"] for r in answer["results"]], scores, rtol=1e-4, atol=1e-5)
    assert answer["query"]["filename"] == "tone.flac" and answer["relevant_total"] is None

    # Uploading a collection clip's own file ranks as the clip query does (marks aside).
    path = run.ids["audio"]["paths"][5]
    upload = client.post("/api/search", files={"audio": ("x.wav", Path(path).read_bytes(), "audio/wav")}).json()
    by_clip = client.get("/api/search", params={"clip": run.ids["audio"]["ids"][5]}).json()
    assert [(r["caption_id"], r["score"]) for r in upload["results"]] == [
        (r["caption_id"], r["score"]) for r in by_clip["results"]]


def instruction_aware_export(run, folder: Path) -> Path:
    """The demo export with prompts that place the instruction before the text and the audio."""
    shutil.copytree(run.export, folder)
    config = json.loads((folder / "embedding_config.json").read_text())
    prompts = config["backbone"]["init_args"]["prompts"]["init_args"]
    prompts["text"] = "{instruction}\n" + prompts["text"]
    prompts["audio"] = "{instruction}\n" + prompts["audio"]
    (folder / "embedding_config.json").write_text(json.dumps(config))
    return folder


def test_instructions_default_per_side_and_can_be_cleared(run, tmp_path):
    model = EmbeddingModel.from_pretrained(instruction_aware_export(run, tmp_path / "aware"))
    service = RetrievalService(model, Collection.load(run.embeddings), text_instruction="Find the sound.",
                               audio_instruction="Describe it.", max_seconds=run.policy.max_seconds)
    client = TestClient(create_app(service))
    info = client.get("/api/info").json()
    assert info["instruction_aware"] == {"text": True, "audio": True}
    assert (info["text_instruction"], info["audio_instruction"]) == ("Find the sound.", "Describe it.")
    text, path = "a beep then a hum", run.ids["audio"]["paths"][1]

    def ranked(params):
        answer = client.get("/api/search", params=params).json()
        return [(r.get("caption_id", r["clip"]), r["score"]) for r in answer["results"]], answer["query"]["instruction"]

    cases = [
        ({"q": text}, "Find the sound."), ({"q": text, "instruction": ""}, None),
        ({"q": text, "instruction": "Retrieve audio."}, "Retrieve audio."),
        ({"clip": run.ids["audio"]["ids"][1]}, "Describe it."),
        ({"clip": run.ids["audio"]["ids"][1], "instruction": ""}, None),
    ]  # fmt: skip
    answers = []
    for params, instruction in cases:
        got, used = ranked(params)
        if "q" in params:
            query = model.encode(text=[text], instruction=instruction)
            corpus, ids = run.tensors["audio"], run.ids["audio"]["ids"]
        else:
            query = model.encode(audio=[path], instruction=instruction, max_seconds=run.policy.max_seconds)
            corpus, ids = run.tensors["text"], run.ids["text"]["ids"]
        rows, scores = brute_force(query, corpus, 10)
        assert used == instruction
        assert [item for item, _ in got] == [ids[i] for i in rows], params
        np.testing.assert_allclose([score for _, score in got], scores, rtol=1e-5, atol=1e-6)
        answers.append(got)
    assert answers[0] != answers[1] and answers[3] != answers[4]  # the instructions reach the model

    # AuroLA's prompts (the demo's) have no place for an instruction: the page hides the box.
    plain = TestClient(create_app(RetrievalService(run.model, Collection.load(run.embeddings))))
    assert plain.get("/api/info").json()["instruction_aware"] == {"text": False, "audio": False}


def test_bad_input_is_refused_and_the_server_keeps_serving(run, client):
    wav = Path(run.ids["audio"]["paths"][0]).read_bytes()
    cases = [
        (client.get("/api/search", params={"q": "   "}), 400, "empty query"),
        (client.get("/api/search"), 400, "empty query"),
        (client.get("/api/search", params={"q": "x", "clip": run.ids["audio"]["ids"][0]}), 400, "not both"),
        (client.get("/api/search", params={"q": "x", "k": 0}), 400, "k must be between 1 and 100, got 0"),
        (client.get("/api/search", params={"q": "x", "k": 101}), 400, "k must be between 1 and 100, got 101"),
        (client.get("/api/search", params={"q": "x", "k": "ten"}), 400, "k: "),
        (client.get("/api/search", params={"clip": "no_such_clip"}), 404, "no clip 'no_such_clip'"),
        (client.post("/api/search", files={"audio": ("noise.wav", os.urandom(4000), "audio/wav")}), 400,
         "cannot decode the upload"),
        (client.post("/api/search", files={"audio": ("cut.wav", wav[:30], "audio/wav")}), 400,
         "cannot decode the upload"),
        (client.post("/api/search", files={"audio": ("empty.wav", b"", "audio/wav")}), 400, "is empty"),
        (client.post("/api/search", data={"k": "3"}), 400, "multipart field 'audio'"),
        (client.post("/api/search", files={"audio": ("a.wav", wav, "audio/wav")}, data={"k": "many"}), 400,
         "k must be an integer"),
        (client.post("/api/search", files={"audio": ("a.wav", wav, "audio/wav")}, data={"k": "0"}), 400,
         "k must be between"),
        (client.get("/no/such/page"), 404, "Not Found"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (message, response.text)
        assert message in response.json()["error"], response.text
    assert "noise.wav" in cases[7][0].json()["error"]  # names the upload, not a temporary file
    assert client.get("/api/search", params={"q": "a beep"}).status_code == 200
    assert client.post("/api/search", files={"audio": ("a.wav", wav, "audio/wav")}).status_code == 200


def test_uploads_over_the_limit_are_refused_unread(run):
    limit = 200_000
    client = TestClient(create_app(RetrievalService(run.model, Collection.load(run.embeddings)), limit))
    small = Path(run.ids["audio"]["paths"][0]).read_bytes()
    assert len(small) < limit
    assert client.post("/api/search", files={"audio": ("a.wav", small, "audio/wav")}).status_code == 200
    # A file just over the limit fits in the multipart overhead: the part itself is measured.
    over = client.post("/api/search", files={"audio": ("big.wav", b"\0" * (limit + 1), "audio/wav")})
    assert over.status_code == 413 and "upload is over the limit" in over.json()["error"]
    # Far over, with a Content-Length: refused before the body is read.
    huge = client.post("/api/search", files={"audio": ("big.wav", b"\0" * (5 * limit), "audio/wav")})
    assert huge.status_code == 413 and "upload limit of 0.191 MB" in huge.json()["error"]
    # No Content-Length (chunked): counted as it arrives.
    chunked = client.post("/api/search", content=iter([b"\0" * 100_000] * 5),
                          headers={"content-type": "multipart/form-data; boundary=b"})
    assert chunked.status_code == 413 and "upload limit" in chunked.json()["error"]
    assert client.get("/api/search", params={"q": "a beep"}).status_code == 200


def test_real_server_refuses_a_chunked_upload_before_it_ends(run):
    """Over a socket (the test client reads whole bodies first): the 413 comes while the client is
    still sending, and the server keeps serving."""
    limit = 200_000
    app = create_app(RetrievalService(run.model, Collection.load(run.embeddings)), limit)
    chunk, chunks = b"\0" * 50_000, 400  # 20 MB offered
    with running_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /api/search HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
            head = b'--b\r\nContent-Disposition: form-data; name="audio"; filename="big.wav"\r\n\r\n'
            sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
            sent, response = 0, b""
            for _ in range(chunks):
                try:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += len(chunk)
                if select.select([sock], [], [], 0.02)[0]:
                    break
            while b"\r\n\r\n" not in response:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert sent < chunks * len(chunk) / 4
        with urllib.request.urlopen(f"{url}/api/search?q=a%20beep") as answer:
            assert answer.status == 200 and json.load(answer)["results"]


def test_audio_is_served_only_from_the_collection_folder(run, client, tmp_path):
    clip, path = run.ids["audio"]["ids"][2], run.ids["audio"]["paths"][2]
    served = client.get(f"/audio/{clip}")
    assert served.status_code == 200 and served.headers["content-type"] == "audio/wav"
    assert served.content == Path(path).read_bytes()
    for attempt in ("/audio/../../etc/passwd", "/audio/..%2F..%2Fetc%2Fpasswd", "/audio/%2Fetc%2Fpasswd",
                    f"/audio/{clip}%2F..%2F..%2F..%2Fetc%2Fpasswd"):
        response = client.get(attempt)
        assert response.status_code == 404, attempt
        assert b"root:" not in response.content

    # A collection whose listing points outside its folder (edited, or a symlink in the folder).
    folder = tmp_path / "collection"
    audio_dir = folder / "audio"
    audio_dir.mkdir(parents=True)
    outside = tmp_path / "secret.wav"
    shutil.copy(path, outside)
    shutil.copy(path, audio_dir / "inside.wav")
    (audio_dir / "link.wav").symlink_to(outside)
    shutil.copy(run.embeddings, folder / "embeddings.safetensors")
    ids = json.loads(ids_path(run.embeddings).read_text())
    paths = [str(audio_dir / "inside.wav")] * len(ids["audio"]["paths"])
    paths[0], paths[1] = str(audio_dir / ".." / ".." / "secret.wav"), str(audio_dir / "link.wav")
    ids["audio"]["paths"] = paths
    ids_path(folder / "embeddings.safetensors").write_text(json.dumps(ids))
    edited = TestClient(create_app(RetrievalService(run.model, Collection.load(folder / "embeddings.safetensors",
                                                                                  audio_root=audio_dir))))
    for row in (0, 1):
        response = edited.get(f"/audio/{ids['audio']['ids'][row]}")
        assert response.status_code == 403 and "outside the collection's folder" in response.json()["error"]
    assert edited.get(f"/audio/{ids['audio']['ids'][2]}").content == Path(path).read_bytes()


def test_a_collection_of_another_width_is_refused_at_startup(run, tmp_path):
    wide = {key: value for key, value in run.tensors.items()}
    for key in ("audio", "text"):
        wide[key] = torch.cat([wide[key], torch.zeros(wide[key].shape[0], 3)], dim=1)
    save_file(wide, str(tmp_path / "embeddings.safetensors"))
    shutil.copy(ids_path(run.embeddings), tmp_path / "embeddings.json")
    width = run.tensors["audio"].shape[1]
    message = f"holds {width + 3}-wide embeddings but the model embeds to {width}"
    with pytest.raises(ValueError, match=message):
        RetrievalService(run.model, Collection.load(tmp_path / "embeddings.safetensors"))
    with pytest.raises(ValueError, match=message):
        app_from_args(["--model", str(run.export), "--embeddings", str(tmp_path / "embeddings.safetensors")])


def test_command_line_loads_a_checkpoint_with_the_recipe_or_an_export(run):
    text = "two knocks, then a siren"
    answers = []
    for model_args in (["--config", CONFIG, "--ckpt_path", str(run.ckpt)], ["--model", str(run.export)]):
        app, options = app_from_args([*model_args, "--embeddings", str(run.embeddings), "--k", "4"])
        assert options.host == "127.0.0.1"
        client = TestClient(app)
        assert client.get("/api/info").json()["clips"] == len(run.ids["audio"]["ids"])
        answers.append(client.get("/api/search", params={"q": text}).json()["results"])
    rows, scores = brute_force(run.model.encode(text=[text]), run.tensors["audio"], 4)
    for results in answers:
        assert [r["clip"] for r in results] == [run.ids["audio"]["ids"][i] for i in rows]
        np.testing.assert_allclose([r["score"] for r in results], scores, rtol=1e-5, atol=1e-6)


def test_info_and_collection_describe_the_collection(run, client):
    info = client.get("/api/info").json()
    assert info["clips"] == run.tensors["audio"].shape[0] and info["captions"] == run.tensors["text"].shape[0]
    assert info["dim"] == run.tensors["audio"].shape[1] and info["audio"] is True
    clips = client.get("/api/collection").json()
    captions = clip_captions(run)
    assert [c["id"] for c in clips] == run.ids["audio"]["ids"]
    assert all(c["captions"] == captions[c["id"]] for c in clips)
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text


# CI installs the browser (.ci/run), so there a missing one fails the test instead of skipping it.
@pytest.mark.skipif(not have_chromium() and not os.environ.get("CI"),
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_page_in_a_headless_browser(run):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    service = RetrievalService(run.model, Collection.load(run.embeddings), max_seconds=run.policy.max_seconds)
    caption, owner = run.ids["text"]["texts"][4], run.ids["text"]["ids"][4].rsplit("#", 1)[0]
    rows, _ = brute_force(run.model.encode(text=[caption]), run.tensors["audio"], 5)
    with running_server(create_app(service)) as url, chromium() as browser:
        browser.get(url)
        WebDriverWait(browser, 30).until(lambda b: "clips" in b.find_element(By.ID, "info").text)
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("5")
        browser.find_element(By.ID, "q").send_keys(caption + "\n")
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "tr.result"))
        results = browser.find_elements(By.CSS_SELECTOR, "tr.result")
        assert [r.get_attribute("data-clip") for r in results] == [run.ids["audio"]["ids"][i] for i in rows]
        assert len(browser.find_elements(By.CSS_SELECTOR, "tr.result audio")) == 5
        marked = [r.get_attribute("data-clip") for r in browser.find_elements(By.CSS_SELECTOR, "tr.relevant")]
        assert marked == [clip for clip in (run.ids["audio"]["ids"][i] for i in rows) if clip == owner]
        # The players load the clips' audio from the server (metadata decoded by the browser).
        durations = WebDriverWait(browser, 30).until(lambda b: b.execute_script(
            "const a = [...document.querySelectorAll('tr.result audio')];"
            "return a.every(x => x.readyState >= 1) ? a.map(x => x.duration) : null;"))
        expected = [sf.info(run.ids["audio"]["paths"][i]).duration for i in rows]
        np.testing.assert_allclose(durations, expected, atol=0.05)

        # A bad query shows the server's message; the page keeps working.
        browser.find_element(By.ID, "clip").send_keys("no_such_clip\n")
        WebDriverWait(browser, 30).until(lambda b: "no clip" in b.find_element(By.ID, "status").text)
        assert "error 404" in browser.find_element(By.ID, "status").text
        clip = browser.find_element(By.ID, "clip")
        clip.clear()
        clip.send_keys(owner + "\n")
        WebDriverWait(browser, 30).until(lambda b: "relevant in the top" in b.find_element(By.ID, "status").text)
        captions = [r.find_element(By.CSS_SELECTOR, "td.what div").text for r in
                    browser.find_elements(By.CSS_SELECTOR, "tr.result")]
        assert len(captions) == 5 and set(captions) <= set(run.ids["text"]["texts"])

        # An uploaded file: the same captions as the clip it is a copy of, unmarked.
        browser.find_element(By.ID, "upload").send_keys(run.ids["audio"]["paths"][run.ids["audio"]["ids"].index(owner)])
        browser.find_element(By.ID, "search-upload").click()
        WebDriverWait(browser, 30).until(lambda b: "query file" in b.find_element(By.ID, "query").text)
        uploaded = [r.find_element(By.CSS_SELECTOR, "td.what div").text for r in
                    browser.find_elements(By.CSS_SELECTOR, "tr.result")]
        assert uploaded == captions and not browser.find_elements(By.CSS_SELECTOR, "tr.relevant")
