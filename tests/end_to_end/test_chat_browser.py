"""`lvm chat` in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`, which `make test`
installs) driven by Selenium against the app served on loopback with the tiny red/blue model of the `trained`
fixture. The page's answers must be `lvm qa`'s for the same video, question and frames."""

import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lvm.chat import Chat, ChatError, TooLong, resolve_in, serve
from lvm.cli import main
from lvm.inference import load_model

pytestmark = [
    pytest.mark.slow,  # trains the tiny red/blue model (the `trained` fixture) and starts browsers
    pytest.mark.xdist_group("chat"),
    pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),
    # Gradio's queue calls pandas 3 the 2.x way (its own code; harmless)
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "chat.png"  # rewritten when missing or with LVM_UPDATE_SCREENSHOT=1
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
WAIT_S = 120
READ_WAIT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(trained):
    model = load_model(trained / "export")
    chat = Chat(model, video_dir=str(trained), cached_videos=2)
    server = serve(chat, host="127.0.0.1", port=free_port(), max_upload_mb=1, block=False, quiet=True)
    yield SimpleNamespace(url=server.local_url, chat=chat, model=model, root=trained, server=server)
    server.close()


@pytest.fixture(scope="module")
def browsers():
    """Headless Chromium windows on demand (each its own browser, so its own Gradio session), closed at the end."""
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opened = []

    def open_page(url):
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1280,900", "--disable-extensions", "--no-first-run"):  # fmt: skip
            opts.add_argument(arg)
        driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
        opened.append(driver)
        driver.get(url)
        Page(driver).wait(lambda d: d.find_elements("css selector", "#upload input[type=file]"), "the page")
        return Page(driver)

    yield open_page
    for driver in opened:
        driver.quit()


@pytest.fixture(scope="module")
def qa_answers():
    return {}


@pytest.fixture
def qa_answer(app, question, qa_answers, capsys):
    """`lvm qa`'s answer (its last stdout line) about a held-out video, with the chat's frames and answer budget."""

    def answer(colour):
        if colour not in qa_answers:
            capsys.readouterr()
            argv = ["qa", "--checkpoint", str(app.root / "export"), "--video", str(app.root / f"held_out_{colour}.mp4"),
                    "--question", question, "--num-frames", str(app.chat.frames_that_fit()),
                    "--max-new-tokens", "32"]  # fmt: skip
            assert main(argv) == 0
            qa_answers[colour] = capsys.readouterr().out.strip().splitlines()[-1]
        return qa_answers[colour]

    return answer


class Page:
    """One browser window on the app, with the few actions the tests need."""

    def __init__(self, driver):
        self.d = driver

    def wait(self, predicate, what, timeout=WAIT_S):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.d, timeout, poll_frequency=0.1).until(predicate, f"waiting for {what}")

    def element(self, css: str):
        """The element `css` names, once the page has rendered it (Gradio draws parts of the page late)."""
        return self.wait(lambda d: (d.find_elements("css selector", css) or [None])[0], css)

    def text(self, elem_id: str) -> str:
        return self.d.find_element("id", elem_id).text

    def upload(self, path) -> None:
        for clear in self.d.find_elements("css selector", "#upload button[aria-label=Clear]"):
            clear.click()
        box = self.wait(
            lambda d: d.find_elements("css selector", "#upload input[type=file]"), "the upload box"
        )
        box[0].send_keys(str(path))

    def video_status(self, contains: str) -> str:
        """The video's status line once it contains `contains` (the read finished). A read compiles and runs
        the model on 2 cores shared with other tests: it gets READ_WAIT_S, and a timeout shows the line."""
        from selenium.common.exceptions import TimeoutException

        try:
            self.wait(
                lambda d: contains in self.text("video-status") and self.idle("video-status"),
                contains,
                timeout=READ_WAIT_S,
            )
        except TimeoutException as err:
            raise AssertionError(
                f"waited {READ_WAIT_S} s for {contains!r} in the video status; it shows "
                f"{self.text('video-status')!r} (idle: {self.idle('video-status')})"
            ) from err
        return self.text("video-status")

    def idle(self, elem_id: str) -> bool:
        trackers = self.d.find_elements("css selector", f"#{elem_id} [data-testid=status-tracker]")
        return all("hide" in (t.get_attribute("class") or "") for t in trackers)

    def answers(self) -> list[str]:
        return [m.text.strip() for m in self.d.find_elements("css selector", "#chat [data-testid=bot]")]

    def ask(self, question: str, submit: bool = True) -> None:
        box = self.element("#question textarea")
        box.clear()
        box.send_keys(question)
        if submit:
            self.element("#send").click()

    def answer(self, asked_before: int) -> tuple[str, str]:
        """(the newest answer, the chat's status line) once the answer after `asked_before` answers is done."""
        self.wait(
            lambda d: len(self.answers()) > asked_before and "answered in" in self.text("chat-status"),
            "the streamed answer",
        )
        return self.answers()[-1], self.text("chat-status")

    def chat_error(self, contains: str) -> str:
        self.wait(lambda d: contains in self.text("chat-status"), contains)
        return self.text("chat-status")

    def frames(self) -> list[str]:
        return [c.text for c in self.d.find_elements("css selector", "#frames .caption-label")]

    def pick(self, name: str) -> None:
        box = self.element("#pick input")
        box.clear()
        box.send_keys(name + "\n")
        self.element("#read-pick").click()


def test_upload_ask_stream_and_score_options(app, browsers, question, qa_answer, tmp_path):
    expected = qa_answer("red")
    assert expected == "Red."
    page = browsers(app.url)
    page.upload(app.root / "held_out_red.mp4")
    n = app.chat.frames_that_fit()
    status = page.video_status("held_out_red.mp4: the model sees")
    assert f"sees {n} of its 6 frames" in status and "of the 256-token context" in status, status
    assert "prefilled once" in status
    captions = page.frames()  # the strip: one thumbnail per frame the model sees, with its timestamp
    assert len(captions) == n and all(c.startswith(f"#{i + 1} · 0:0") for i, c in enumerate(captions)), (
        captions
    )
    page.ask(question)
    answer, timing = page.answer(0)
    assert answer == expected, timing
    assert "first token after" in timing and "video prefix reused" in timing
    page.ask(question)  # a second question reuses the prefix
    assert page.answer(1)[0] == expected

    # streaming: the answer arrives in pieces, each a prefix of Model.answer's greedy answer
    video = app.chat.read(str(app.root / "held_out_red.mp4"))
    events = list(app.chat.ask(video, question))
    assert len(events) > 2 and events[-1].done and events[-1].text == expected
    streamed = [e.text for e in events[:-1]]
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:], strict=False))
    assert streamed[-1].strip() == expected == app.model.answer(video.ctx, question, max_new_tokens=32)

    # multiple choice: the options' probabilities (from Model.option_logprobs) as a bar chart
    page.element("#multiple-choice input").click()
    options = page.wait(lambda d: d.find_element("css selector", "#options textarea"), "the options box")
    options.send_keys("Blue.\nRed.")
    page.ask(question)
    page.wait(lambda d: "options scored" in page.text("chat-status"), "the options' scores")
    probs = app.chat.score(video, question, ["Blue.", "Red."])
    assert probs[1] > 0.5 and page.answers()[-1].startswith("Red. (Blue. "), page.answers()
    page.wait(lambda d: d.find_element("id", "bars").is_displayed(), "the bar chart")
    shot = tmp_path / "chat.png"
    page.d.set_window_size(1280, 1250)  # the whole page, bar chart included
    page.d.save_screenshot(str(shot))
    if os.environ.get("LVM_UPDATE_SCREENSHOT") == "1" or not SCREENSHOT.exists():
        from PIL import Image

        Image.open(shot).convert("RGB").quantize(64).save(SCREENSHOT, optimize=True)


def test_bad_input_gets_a_message_and_the_page_goes_on(app, browsers, question, qa_answer, tmp_path):
    expected = qa_answer("blue")
    page = browsers(app.url)
    page.ask(question)  # no video yet
    assert page.chat_error("upload a video").startswith("⚠")
    page.upload(app.root / "held_out_blue.mp4")
    page.video_status("held_out_blue.mp4: the model sees")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    page.upload(broken)
    status = page.video_status("cannot read broken.mp4 as a video")
    assert status.startswith("⚠") and "Still talking about held_out_blue.mp4" in status, status
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    page.upload(empty)
    page.video_status("empty.mp4 is empty")
    page.ask("why " * 40)  # longer than the question budget
    assert "shorten it" in page.chat_error("the question is")
    page.ask(question)  # the session still has its video
    assert page.answer(0)[0] == expected

    # a video longer than the context at the asked rate: the page offers the frames that fit
    page.element("#budgets button.label-wrap").click()  # open "Frames and budgets"
    fps = page.wait(lambda d: d.find_element("css selector", "#fps input"), "the fps field")
    fps.clear()
    fps.send_keys("4\t")
    page.upload(app.root / "held_out_red.mp4")
    status = page.video_status("gives 6 frames at 4 fps")
    assert "held_out_red.mp4 (0:01.5)" in status, status
    offer = page.wait(lambda d: d.find_element("id", "fewer-frames"), "the offer of fewer frames")
    page.wait(lambda d: offer.is_displayed(), "the offer button")
    assert f"Read {app.chat.frames_that_fit()} frames evenly" in offer.text
    offer.click()
    page.video_status("held_out_red.mp4: the model sees")

    # typed paths are read only inside --video-dir
    page.pick("../../etc/passwd")
    page.video_status("'..' is not allowed")
    page.pick("held_out_blue.mp4")
    page.video_status("held_out_blue.mp4: the model sees")
    page.ask(question)
    assert page.answer(0)[0] == expected

    # an upload over --max-upload-mb never reaches the model
    big = tmp_path / "big.mp4"
    big.write_bytes(b"\0" * (2 << 20))
    page.upload(big)
    body = lambda d: d.find_element("tag name", "body").text  # noqa: E731
    page.wait(lambda d: 'exceed the maximum allowed size of 1.0 Mb: "big.mp4"' in body(d), "the size error")
    assert "big.mp4" not in page.text("video-status")


def test_two_sessions_each_talk_about_their_own_video(app, browsers, question, qa_answer):
    expected = {colour: qa_answer(colour) for colour in ("red", "blue")}
    assert expected == {"red": "Red.", "blue": "Blue."}
    pages = {colour: browsers(app.url) for colour in expected}
    for colour, page in pages.items():
        page.upload(app.root / f"held_out_{colour}.mp4")
    for colour, page in pages.items():
        page.video_status(f"held_out_{colour}.mp4: the model sees")
    for page in pages.values():  # both questions queue on the one model
        page.ask(question)
    for colour, page in pages.items():
        assert page.answer(0)[0] == expected[colour]
        assert f"held_out_{colour}.mp4" in page.text("video-status")


def test_paths_stay_inside_the_video_folder(app, tmp_path):
    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.mp4").write_bytes(b"x")
    (tmp_path / "secret.mp4").write_bytes(b"x")
    (root / "out").symlink_to(tmp_path)  # a link inside the folder to outside it
    assert resolve_in(str(root), "sub/a.mp4") == str(root / "sub" / "a.mp4")
    for bad in ("../x.mp4", "/etc/passwd", "sub/../../x", "out/secret.mp4", "gs://b/x.mp4", "C:/x", ""):
        with pytest.raises(ChatError):
            resolve_in(str(root), bad)
    assert resolve_in("gs://bucket/videos", "sub/a.mp4") == "gs://bucket/videos/sub/a.mp4"
    with pytest.raises(TooLong) as err:
        app.chat.read(str(app.root / "held_out_red.mp4"), frames=app.chat.frames_that_fit() + 1)
    assert err.value.fit == app.chat.frames_that_fit()


def test_chat_command_names_bad_arguments(app, capsys):
    export = str(app.root / "export")
    port = app.url.rstrip("/").rsplit(":", 1)[1]  # taken by the app
    for argv, message in [
        (["--video-dir", str(app.root / "missing")], "no such folder"),
        (["--port", port], f"cannot listen on 127.0.0.1:{port}"),
    ]:
        assert main(["chat", "--checkpoint", export, *argv]) == 2
        assert message in capsys.readouterr().err
