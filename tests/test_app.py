"""The Gradio demo: its jobs in-process, then the page end to end in a real headless Chromium.

The app runs as `python app.py` on a free loopback port with the tiny preset, random weights (the hidden
--random_weights flag), T=5 and a frame cap of 4. The browser is Debian's chromium driven by Selenium through
chromium-driver (.ci/run installs both); without them the browser tests skip, except under CI=true, where they fail.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

from config import EditConfig
from demo.inputs import InputError
from demo.jobs import Cancelled, Demo, EditRequest, random_weights
from video_io import read_video_info

N_FRAMES = 4  # the frame cap of every test here
LOGIN = ('tester', 'pw-123')  # the page's login (--auth_file)
T = 5
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
CHROMEDRIVER = shutil.which('chromedriver')


# --------------------------------------------------------------------------------------------------------------------
# The jobs, in-process


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo_root')
    cfg = random_weights(EditConfig(template='tiny', device='cpu', T=T), tmp_path_factory.mktemp('weights'))
    d = Demo(cfg, root, max_bytes=10**8, max_frames=N_FRAMES, session_ttl=3600, max_edits=4)
    yield d
    d.shutdown()


def upload_copy(video: Path, tmp_path: Path) -> Path:
    """A copy standing in for the web server's copy of an upload (which `Demo.receive` moves away)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(video, tmp_path / video.name))


def test_preview_edit_reuse_and_session_folder(demo, test_videos_dir, tmp_path):
    upload = upload_copy(test_videos_dir / 'sample_24f_540p.mp4', tmp_path / 'web')
    session = demo.receive('k1', upload)
    assert not upload.exists()  # moved into the session folder
    p = demo.preview('k1', 0, None, None)
    assert p.selection.frames == N_FRAMES and p.missing == []
    assert 'editing frames 0–3 of 24 (4 frames), cap 4' in p.text and 'Face found in 4 of 4 frames' in p.text
    assert p.frame.parent.parent == session.folder and p.crop.is_file()
    first = demo.edit('k1', EditRequest('classifier', [0.5], attributes=['Smiling', 'Bald'], T=T))
    assert [r.name for r in first.results] == ['Smiling_0.50', 'Bald_0.50']
    assert first.summary['cache_hits'] == {'align': True, 'invert': False}  # the preview found the faces
    assert 'Inversion computed (4 network calls per frame)' in first.text
    for r in first.results:
        assert read_video_info(r.video)[0] == N_FRAMES and read_video_info(r.side_by_side)[0] == N_FRAMES
        with zipfile.ZipFile(r.frames_zip) as zf:
            assert len([n for n in zf.namelist() if n.endswith('.png')]) == N_FRAMES
        cfg = json.loads(r.config.read_text())
        assert cfg['config']['T'] == T and cfg['input'] == 'sample_24f_540p.mp4'
        assert (cfg['config']['start'], cfg['config']['max_num']) == (0, N_FRAMES)
        assert cfg['config']['video_path'] == 'sample_24f_540p.mp4'  # no server path shown or downloaded
        assert str(demo.root) not in r.config.read_text() and str(Path.home()) not in r.config.read_text()
    second = demo.edit('k1', EditRequest('classifier', [-0.5], attributes=['Smiling'], T=T, blend='feather'))
    assert second.summary['cache_hits'] == {'align': True, 'invert': True}
    assert '**Inversion reused from the cache**: each edit cost 5 network calls per frame (T = 5) instead of 9' \
        in second.text
    assert json.loads(second.results[0].config.read_text())['blend'] == 'feather'
    assert first.results[0].video.is_file()  # a later run never replaces an earlier run's files
    third = demo.edit('k1', EditRequest('classifier', [0.2], attributes=['Bald'], T=T, decoder='dpm++2m'))
    assert json.loads(third.results[0].config.read_text())['config']['decoder'] == 'dpm++2m'
    assert third.summary['cache_hits']['invert'] and read_video_info(third.results[0].video)[0] == N_FRAMES
    # everything the session made is inside its folder, and goes with it
    assert list(session.cache_dir.glob('encode-*')) and first.results[0].folder.is_relative_to(session.folder)
    demo.close('k1')
    assert not session.folder.exists() and list(demo.sessions.root.iterdir()) == []


def test_clip_edit_finds_the_direction_once(demo, test_videos_dir, tmp_path):
    demo.receive('k2', upload_copy(test_videos_dir / 'sample_24f_540p.mp4', tmp_path))
    request = EditRequest('clip', [1.0], src_txt='face', trg_txt='face with beard', clip_iters=2, T=T)
    run = demo.edit('k2', request, 2, 4, None)
    assert [r.name for r in run.results] == ['face_with_beard_1.00'] and run.summary['frames'] == 2
    directions = list((demo.sessions.get('k2').results_dir() / 'directions').glob('*.pt'))
    assert len(directions) == 1
    mtime = directions[0].stat().st_mtime_ns
    again = demo.edit('k2', EditRequest('clip', [0.5, 2.0], src_txt='face', trg_txt='face with beard',
                                        clip_iters=2, T=T), 2, 4, None)
    assert [r.name for r in again.results] == ['face_with_beard_0.50', 'face_with_beard_2.00']
    assert directions[0].stat().st_mtime_ns == mtime and again.summary['cache_hits']['invert']
    demo.close('k2')


def test_zip_of_frames_and_the_sample(demo, sample_video_dir, test_videos_dir, tmp_path):
    frames = sorted(sample_video_dir.glob('*.jpeg'))[:3]
    upload = tmp_path / 'web' / 'talk.zip'
    upload.parent.mkdir()
    with zipfile.ZipFile(upload, 'w') as zf:
        for p in frames:
            zf.write(p, f'talk/{p.name}')
    session = demo.receive('k5', upload)
    path, name = session.input
    assert name == 'talk.zip' and path.is_relative_to(session.folder) and len(list(path.iterdir())) == 3
    p = demo.preview('k5', 1, None, None)
    assert 'talk.zip**: 1920×1080; editing frames 1–2 of 3 (2 frames)' in p.text
    demo.sample = test_videos_dir / 'sample_24f_540p.mp4'
    try:
        demo.use_sample('k5')
        assert not path.exists()  # the previous input's files go
        assert 'sample_24f_540p.mp4**: 960×540, 25 fps' in demo.preview('k5', 0, None, 2).text
    finally:
        demo.sample = None
    assert (test_videos_dir / 'sample_24f_540p.mp4').is_file()  # the server's sample is never moved
    demo.close('k5')


def test_user_errors_are_messages(demo, test_videos_dir, tmp_path):
    with pytest.raises(InputError, match='upload a video file or a zip of frames first'):
        demo.preview('k3', 0, None, None)
    demo.receive('k3', upload_copy(test_videos_dir / 'sample_24f_540p.mp4', tmp_path / 'web'))
    notes = tmp_path / 'notes.txt'
    notes.write_text('hello')
    with pytest.raises(InputError, match='notes.txt is not a video file'):
        demo.receive('k3', notes)
    assert not notes.exists()  # the web server's copy goes in every case
    with pytest.raises(InputError, match='upload a video file or a zip of frames first'):
        demo.edit('k3', EditRequest('classifier', [0.3], attributes=['Bald'], T=T))  # not the earlier video
    blank = tmp_path / 'blank.mp4'
    import numpy as np

    from video_io import write_video

    write_video(blank, [np.full((64, 96, 3), 40, np.uint8)] * 3, fps=10)
    demo.receive('k3', blank)
    with pytest.raises(InputError, match='no face found in any of the 3 selected frames of blank.mp4'):
        demo.preview('k3', 0, None, None)
    with pytest.raises(InputError, match='choose at least one attribute'):
        demo.edit('k3', EditRequest('classifier', [0.3], attributes=[], T=T))
    with pytest.raises(InputError, match='5 edits at once; this server renders at most 4'):
        demo.edit('k3', EditRequest('classifier', [0.1, 0.2, 0.3, 0.4, 0.5], attributes=['Bald'], T=T))
    with pytest.raises(InputError, match='T must be one of'):
        demo.edit('k3', EditRequest('classifier', [0.3], attributes=['Bald'], T=7))
    demo.close('k3')


def test_a_stopped_edit_stops_its_work(demo, test_videos_dir, tmp_path, monkeypatch):
    from editing import core

    real, started, calls = core.ddim_invert, threading.Event(), []

    def slow(*args, **kwargs):
        started.set()
        while True:  # an endless inversion: only a stop ends it
            calls.append(1)
            time.sleep(0.01)

    monkeypatch.setattr(core, 'ddim_invert', slow)
    session = demo.receive('k4', upload_copy(test_videos_dir / 'sample_24f_540p.mp4', tmp_path))
    outcome: list = []

    def edit() -> None:
        try:
            demo.edit('k4', EditRequest('classifier', [0.3], attributes=['Bald'], T=T))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome.append(e)

    thread = threading.Thread(target=edit)
    thread.start()
    assert started.wait(60)
    assert demo.stop('k4')
    thread.join(60)
    assert not thread.is_alive() and len(outcome) == 1 and isinstance(outcome[0], Cancelled)
    n = len(calls)
    time.sleep(0.1)
    assert len(calls) == n  # the inversion loop no longer runs
    assert not (session.results_dir()).exists()  # no result was written
    monkeypatch.setattr(core, 'ddim_invert', real)
    run = demo.edit('k4', EditRequest('classifier', [0.3], attributes=['Bald'], T=T))  # the worker is free again
    assert run.summary['frames'] == N_FRAMES
    demo.close('k4')


def test_a_preview_during_that_pages_edit_shows_the_edits_faces(demo, test_videos_dir, tmp_path, monkeypatch):
    """The preview and the edit share the page's cached alignment: asked for while the edit is inverting, the preview
    answers at once with the faces the edit found (and computes nothing)."""
    from editing import core, pipeline

    real, inverting, go_on = core.ddim_invert, threading.Event(), threading.Event()

    def held(*args, **kwargs):
        inverting.set()
        assert go_on.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(core, 'ddim_invert', held)
    demo.receive('k5', upload_copy(test_videos_dir / 'sample_24f_540p.mp4', tmp_path))
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(
        demo.edit('k5', EditRequest('classifier', [0.5], attributes=['Smiling'], T=T))))
    thread.start()
    assert inverting.wait(120)
    aligned = []
    monkeypatch.setattr(pipeline, 'align', lambda *a, **k: aligned.append(1))
    preview = demo.preview('k5', 0, None, None)
    assert preview.selection.frames == N_FRAMES and 'Face found in 4 of 4 frames' in preview.text and not aligned
    go_on.set()
    thread.join(120)
    assert not thread.is_alive() and outcome[0].summary['frames'] == N_FRAMES
    demo.close('k5')


def test_a_bad_login_file_stops_the_app_before_it_loads_anything(tmp_path):
    import app

    (tmp_path / 'logins.txt').write_text('tester\n')
    for path, message in ((tmp_path / 'missing.txt', 'cannot read the login file'), (tmp_path / 'logins.txt',
                                                                                     'line 1: expected user:password')):
        with pytest.raises(SystemExit, match=f'--auth_file: .*{message}'):
            app.main(['--auth_file', str(path), '--tmp_dir', str(tmp_path)])
    assert not list(tmp_path.glob('dva-demo-*'))


# --------------------------------------------------------------------------------------------------------------------
# The page in a browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def browser_tools():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get('CI', '').lower() == 'true':
            pytest.fail('chromium and chromium-driver are needed for the browser tests (.ci/run installs them)')
        pytest.skip('chromium and chromium-driver are not installed')
    pytest.importorskip('selenium')


@pytest.fixture(scope='module')
def server(browser_tools, test_videos_dir, tmp_path_factory):
    """`python app.py` on a free loopback port with random tiny weights; yields its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp('app') / 'app.log'
    logins = log.parent / 'logins.txt'
    logins.write_text(f'# the page asks for a login\n{LOGIN[0]}:{LOGIN[1]}\n')
    cmd = [sys.executable, 'app.py', '--host', '127.0.0.1', '--port', str(port), '--template', 'tiny',
           '--random_weights', '--device', 'cpu', '--T', str(T), '--max_frames', str(N_FRAMES),
           '--sample', str(test_videos_dir / 'sample_24f_540p.mp4'), '--tmp_dir', str(log.parent),
           '--max_upload', '1MB', '--auth_file', str(logins)]
    with open(log, 'wb') as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}/'
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f'the app did not start:\n{log.read_text()[-3000:]}')
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert not list(log.parent.glob('dva-demo-*')), 'the demo left its temporary folder behind'


@pytest.fixture
def page(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1280,1900',
                '--mute-audio', '--autoplay-policy=no-user-gesture-required'):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.get(server)
    log_in(driver, LOGIN[0], 'wrong')  # refused: a message, no page
    deadline = time.monotonic() + 30
    while 'incorrect credentials' not in driver.page_source.lower():
        assert time.monotonic() < deadline, 'no message about the wrong password'
        time.sleep(0.2)
    assert not driver.find_elements(By.ID, 'upload')
    driver.get(server)
    log_in(driver, *LOGIN)
    wait_for_css(driver, '#upload')
    yield driver
    driver.quit()


def log_in(driver, user: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    for selector in ('input[type=text]', 'input[type=password]', 'button'):
        wait_for_css(driver, selector)
    driver.find_element(By.CSS_SELECTOR, 'input[type=text]').send_keys(user)
    driver.find_element(By.CSS_SELECTOR, 'input[type=password]').send_keys(password)
    driver.find_element(By.XPATH, "//button[normalize-space()='Login']").click()
    time.sleep(1)


def wait_for_css(driver, selector: str, seconds: float = 60) -> None:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + seconds
    while not driver.find_elements(By.CSS_SELECTOR, selector):
        assert time.monotonic() < deadline, f'nothing matches {selector!r}'
        time.sleep(0.2)


def text_of(driver, elem_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, elem_id).text


def wait_for(driver, elem_id: str, needle: str, seconds: float = 150) -> str:
    """The text of #elem_id once it holds `needle` (fails with what it holds after `seconds`)."""
    deadline = time.monotonic() + seconds
    while needle not in (text := text_of(driver, elem_id)):
        assert time.monotonic() < deadline, f'#{elem_id} never showed {needle!r}; it shows {text!r}'
        time.sleep(0.2)
    return text


def upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, '#upload button[aria-label="Clear"]'):
        button.click()
    deadline = time.monotonic() + 30
    while not (inputs := driver.find_elements(By.CSS_SELECTOR, '#upload input[type=file]')):
        assert time.monotonic() < deadline, 'no file input'
        time.sleep(0.1)
    inputs[0].send_keys(str(path))


def fetch(url: str, driver=None) -> bytes:
    """GET url, with the browser's login cookies when `driver` is given."""
    assert url.startswith('http://127.0.0.1:')
    cookies = '; '.join(f"{c['name']}={c['value']}" for c in driver.get_cookies()) if driver else ''
    with urllib.request.urlopen(urllib.request.Request(url, headers={'Cookie': cookies}), timeout=30) as r:
        assert r.status == 200
        return r.read()


def set_scale(driver, value: float) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, '#scale input[type=number]')
    box.clear()
    box.send_keys(str(value), Keys.TAB)


def test_edit_in_the_browser(page, test_videos_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    upload(page, test_videos_dir / 'sample_24f_540p.mp4')
    text = wait_for(page, 'preview_status', 'Face found')
    assert 'editing frames 0–3 of 24 (4 frames)' in text and 'a face in every frame' in text
    assert page.find_elements(By.CSS_SELECTOR, '#preview_frame img') and page.find_elements(
        By.CSS_SELECTOR, '#preview_crop img')
    # the attribute: Smiling instead of the default Mustache; scale 0.5
    page.find_element(By.CSS_SELECTOR, '#attributes .token-remove').click()
    box = page.find_element(By.CSS_SELECTOR, '#attributes input')
    box.click()
    box.send_keys('Smiling', Keys.ENTER)
    assert [e.text for e in page.find_elements(By.CSS_SELECTOR, '#attributes .token')] == ['Smiling']
    set_scale(page, 0.5)
    page.find_element(By.ID, 'edit').click()
    status = wait_for(page, 'status', 'Inversion')
    assert 'Inversion computed (4 network calls per frame)' in status
    # the result video plays in the page: the whole file, 4 frames at 25 fps, 960x540
    played = page.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const v = document.querySelector('#result_video video');
        const info = () => ({src: v.currentSrc, duration: v.duration, width: v.videoWidth, ended: v.ended,
                             error: v.error && v.error.code});
        v.muted = true;
        v.addEventListener('ended', () => done(info()));
        v.play().catch(e => done({...info(), failed: String(e)}));
        setTimeout(() => done({...info(), timeout: true}), 30000);""")
    assert played['ended'] and played['error'] is None and played['width'] == 960, played
    assert played['duration'] == pytest.approx(N_FRAMES / 25, abs=0.02)
    video = tmp_path / 'out.mp4'
    video.write_bytes(fetch(played['src'], page))
    with pytest.raises(urllib.error.HTTPError, match='401'):  # the results need the login too
        fetch(played['src'])
    assert read_video_info(video)[0] == N_FRAMES and played['src'].endswith('/Smiling_0.50/out.mp4')
    side = page.find_element(By.CSS_SELECTOR, '#side_by_side video').get_attribute('src')
    (tmp_path / 'side.mp4').write_bytes(fetch(side, page))
    n, _, size = read_video_info(tmp_path / 'side.mp4')
    assert n == N_FRAMES and size[0] > 960  # original | edit
    # the downloads: both videos, the frames as a zip, the config of the run
    links = {Path(a.get_attribute('href')).name: a.get_attribute('href')
             for a in page.find_elements(By.CSS_SELECTOR, '#downloads a')}
    assert sorted(links) == ['Smiling_0.50_frames.zip', 'config.json', 'out.mp4', 'side_by_side.mp4']
    with zipfile.ZipFile(io.BytesIO(fetch(links['Smiling_0.50_frames.zip'], page))) as zf:
        assert sorted(zf.namelist()) == [f'Smiling_0.50_frames/{i:06d}.png' for i in range(N_FRAMES)]
    config = json.loads(fetch(links['config.json'], page))
    assert (config['attribute'], config['scale'], config['config']['T'], config['frames']) == ('Smiling', 0.5, T,
                                                                                                N_FRAMES)
    shown = json.loads(page.find_element(By.CSS_SELECTOR, '#config textarea').get_attribute('value'))
    assert shown == config
    # a second edit of the same upload reuses the inversion, and the page says so
    set_scale(page, -0.5)
    page.find_element(By.ID, 'edit').click()
    status = wait_for(page, 'status', 'reused from the cache')
    assert 'each edit cost 5 network calls per frame (T = 5) instead of 9' in status
    deadline = time.monotonic() + 30
    while not (src := page.find_element(By.CSS_SELECTOR, '#result_video video').get_attribute('src')
               or '').endswith('/Smiling_-0.50/out.mp4'):
        assert time.monotonic() < deadline, src
        time.sleep(0.2)
    page.execute_script('window.scrollTo(0, 0)')
    shot = tmp_path / 'demo.png'
    page.save_screenshot(str(shot))
    assert shot.stat().st_size > 0
    if os.environ.get('DVA_DEMO_SCREENSHOT'):  # e.g. for docs/demo.png
        shutil.copy(shot, os.environ['DVA_DEMO_SCREENSHOT'])


def test_bad_uploads_get_messages_in_the_page(page, tmp_path):
    from selenium.webdriver.common.by import By

    notes = tmp_path / 'notes.txt'
    notes.write_text('these are not frames')
    upload(page, notes)
    assert 'Error: notes.txt is not a video file (.mp4, .mov, .avi, .mkv, .webm) nor a zip of frames' in wait_for(
        page, 'preview_status', 'notes.txt')
    escaping = tmp_path / 'frames.zip'
    with zipfile.ZipFile(escaping, 'w') as zf:
        zf.writestr('frames/000.png', b'')
        zf.writestr('../../escape.png', b'')
    upload(page, escaping)
    text = wait_for(page, 'preview_status', 'escape.png')
    assert "Error: the zip entry '../../escape.png' points outside the zip's folder: refused" in text
    big = tmp_path / 'big.mp4'
    big.write_bytes(bytes(2_000_000))
    upload(page, big)  # refused by the page before it is sent (the server refuses it too)
    deadline = time.monotonic() + 30
    while not any('big.mp4' in e.text for e in page.find_elements(By.CSS_SELECTOR, '[data-testid="toast-body"]')):
        assert time.monotonic() < deadline, 'no message about the size limit'
        time.sleep(0.2)
    toast = next(e.text for e in page.find_elements(By.CSS_SELECTOR, '[data-testid="toast-body"]')
                 if 'big.mp4' in e.text)
    assert 'exceed the maximum allowed size' in toast
    assert 'Traceback' not in page.page_source
