"""A web page for editing face videos with DVA (Gradio), on a GPU box or a Hugging Face Space.

    python app.py                              # http://127.0.0.1:7860, the weights of download_requirements.sh
    python app.py --host 0.0.0.0 --port 8080   # reachable from other machines; --share: a public gradio.live link

Upload a video file or a zip of frames (or pick the sample video), check the preview (the first frame with the face
found, its aligned crop, the frames without a face), then edit with CelebA attributes or a CLIP text; every edit of
the same upload reuses its cached inversion. The work is `demo.jobs`; the upload checks are `demo.inputs`.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import gradio as gr

from config import CELEBA_ATTRIBUTES, EditConfig
from demo.inputs import InputError, format_size, parse_size, read_logins
from demo.jobs import T_CHOICES, Cancelled, Demo, EditRequest, config_text, parse_scales, random_weights

log = logging.getLogger('dva.app')


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--host', default=os.environ.get('GRADIO_SERVER_NAME', '127.0.0.1'),
                   help='address to serve on (0.0.0.0: every interface; default $GRADIO_SERVER_NAME, as a Hugging '
                        'Face Space sets it, else 127.0.0.1)')
    p.add_argument('--port', type=int, default=int(os.environ.get('GRADIO_SERVER_PORT', '7860')),
                   help='port (default $GRADIO_SERVER_PORT, else 7860)')
    p.add_argument('--share', action='store_true', help='also publish the page through a gradio.live link')
    p.add_argument('--auth_file', help='ask for a login: a file of user:password lines (the results, served from '
                                       'per-session folders, then need the login too)')
    p.add_argument('--checkpoint', help='DVA checkpoint (default checkpoints/diffusion_video_autoencoder/'
                                        'epoch=51-step=1000000.ckpt, else last.ckpt there)')
    p.add_argument('--cls_checkpoint', default=EditConfig.cls_checkpoint, help='attribute classifier checkpoint')
    p.add_argument('--clip_weights', default='pretrained_models/ViT-B-16.pt', help='OpenAI ViT-B/16 weights')
    p.add_argument('--template', default=EditConfig.template, help='network preset of checkpoints without a config')
    p.add_argument('--pretrained_dir', default=EditConfig.pretrained_dir,
                   help='folder with shape_predictor_68_face_landmarks.dat')
    p.add_argument('--device', default='auto', help='auto (CUDA when available, else CPU), cpu, cuda or cuda:N')
    p.add_argument('--precision', default='fp32', choices=('fp32', 'fp16', 'bf16'),
                   help='fp16/bf16: autocast of the network on CUDA')
    p.add_argument('--batch_size', default='auto', help='frames per network batch, or auto (default)')
    p.add_argument('--T', type=int, default=20, choices=T_CHOICES, help='the page\'s default DDIM steps (default 20; '
                                                                         'the paper\'s tables use 100)')
    p.add_argument('--sample', default='sample_video', help='the video offered as "sample video" (frame folder or '
                                                            'video file; hidden when absent)')
    p.add_argument('--max_upload', default='500MB', help='upload size limit, also for a zip\'s extracted frames (default 500MB)')
    p.add_argument('--max_frames', type=int, default=300, help='frame cap: at most this many frames per edit (default 300)')
    p.add_argument('--max_edits', type=int, default=8, help='at most this many (attribute, scale) edits per request (default 8)')
    p.add_argument('--session_ttl', type=float, default=3600,
                   help='seconds without a request after which a session\'s files are removed (default 3600)')
    p.add_argument('--tmp_dir', help='parent of the demo\'s temporary folder (default: the system\'s)')
    p.add_argument('--random_weights', action='store_true', help=argparse.SUPPRESS)  # tests: random tiny weights
    return p


def build_page(demo: Demo, default_T: int):
    """The Gradio page around `demo`. Every handler turns a user error into a message in the page."""
    from editing.api import EditError

    def guarded(fn, error_outputs):
        """Run a handler; an input error, a stop or an unexpected failure becomes a message, never a traceback."""
        @functools.wraps(fn)  # Gradio reads the signature: inputs, gr.Request, gr.Progress
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (InputError, EditError) as e:
                return error_outputs(f'**Error:** {e}')
            except Cancelled:
                return error_outputs('Stopped.')
            except Exception:
                log.exception('the demo failed')
                return error_outputs('**Error:** the server failed on this request (the log has the details).')
        return wrapper

    tracked = gr.Progress(track_tqdm=True)  # the editing API's tqdm bars, shown in the page

    def on_upload(file, start, end, cap, request: gr.Request, progress=tracked):
        if file is None:
            return gr.update(), gr.update(), gr.update()
        demo.receive(request.session_hash, file)
        return on_preview(start, end, cap, request, progress)

    def on_sample(start, end, cap, request: gr.Request, progress=tracked):
        demo.use_sample(request.session_hash)
        return on_preview(start, end, cap, request, progress)

    def on_preview(start, end, cap, request: gr.Request, progress=tracked):
        p = demo.preview(request.session_hash, start, end, cap, progress)
        return str(p.frame), str(p.crop), p.text

    def run(request_: EditRequest, start, end, cap, request: gr.Request, progress):
        r = demo.edit(request.session_hash, request_, start, end, cap, progress)
        first = r.results[0]
        return (r.text, gr.update(choices=[x.name for x in r.results], value=first.name), str(first.video),
                str(first.side_by_side), [str(p) for p in first.downloads], config_text(first),
                {x.name: x for x in r.results})

    def on_edit(attributes, scale, extra, T, decoder, blend, start, end, cap, request: gr.Request,
                progress=tracked):
        edit = EditRequest('classifier', parse_scales(scale, extra), attributes=list(attributes or []), T=int(T),
                           decoder=decoder, blend=blend)
        return run(edit, start, end, cap, request, progress)

    def on_clip(src, trg, scale, extra, iters, T, decoder, blend, start, end, cap, request: gr.Request,
                progress=tracked):
        edit = EditRequest('clip', parse_scales(scale, extra), src_txt=src or '', trg_txt=trg or '',
                           clip_iters=int(iters), T=int(T), decoder=decoder, blend=blend)
        return run(edit, start, end, cap, request, progress)

    def on_pick(name, results):
        r = (results or {}).get(name)
        if r is None or not all(p.is_file() for p in r.downloads):  # gone with the session
            return gr.update(), gr.update(), gr.update(), gr.update()
        return str(r.video), str(r.side_by_side), [str(p) for p in r.downloads], config_text(r)

    def on_stop(request: gr.Request):
        demo.stop(request.session_hash)

    def on_unload(request: gr.Request):
        demo.close(request.session_hash)

    cap_limit = demo.max_frames
    with gr.Blocks(title='DVA: face video editing', delete_cache=(600, int(demo.sessions.ttl))) as page:
        gr.Markdown('# Diffusion Video Autoencoders: face video editing\nEdit the face in a video: the identity is '
                    'edited once for the whole video, so every frame changes the same way '
                    '([paper](https://arxiv.org/abs/2212.02802)). Upload a short video or a zip of frames, check '
                    f'the face in the preview, then edit. At most {cap_limit} frames and '
                    f'{format_size(demo.max_bytes)} per upload; your files are deleted when you close the page '
                    f'(or after {demo.sessions.ttl / 60:.0f} minutes without a request).')
        with gr.Row():
            with gr.Column():
                upload = gr.File(label='video file or zip of frames', type='filepath', elem_id='upload')
                sample = gr.Button('use the sample video', visible=demo.sample is not None, elem_id='sample')
                with gr.Row():
                    start = gr.Number(0, label='start frame', precision=0, minimum=0, elem_id='start')
                    end = gr.Number(None, label='end frame (0: start + cap)', precision=0, elem_id='end')
                    cap = gr.Number(cap_limit, label=f'frame cap (≤ {cap_limit})', precision=0, minimum=1,
                                    maximum=cap_limit, elem_id='cap')
                preview_btn = gr.Button('preview the frame range', elem_id='preview')
            with gr.Column():
                with gr.Row():
                    frame_img = gr.Image(label='first frame and the face found', type='filepath', interactive=False,
                                         elem_id='preview_frame', scale=3, height=260)
                    crop_img = gr.Image(label='aligned crop', type='filepath', interactive=False,
                                        elem_id='preview_crop', scale=1, height=260)
                preview_md = gr.Markdown('Upload a video to see the face found in it.', elem_id='preview_status')
        with gr.Tabs():
            with gr.Tab('CelebA attributes'):
                attributes = gr.Dropdown(list(CELEBA_ATTRIBUTES), value=['Mustache'], multiselect=True,
                                         label='attributes (several: one edit each)', elem_id='attributes')
                with gr.Row():
                    scale = gr.Slider(-1, 1, 0.3, step=0.05, label='scale', elem_id='scale')
                    extra = gr.Textbox(label='more scales (optional)', placeholder='-0.3, 0.5', elem_id='extra')
                edit_btn = gr.Button('edit', variant='primary', elem_id='edit')
            with gr.Tab('CLIP text'):
                with gr.Row():
                    src = gr.Textbox('face', label='source text', elem_id='src_txt')
                    trg = gr.Textbox('face with beard', label='target text', elem_id='trg_txt')
                with gr.Row():
                    clip_scale = gr.Slider(-3, 3, 1.0, step=0.1, label='scale', elem_id='clip_scale')
                    clip_extra = gr.Textbox(label='more scales (optional)', placeholder='0.5, 1.5')
                    clip_iters = gr.Slider(10, 2000, 200, step=10, label='CLIP iterations (the search runs once '
                                                                        'per upload and texts)')
                clip_btn = gr.Button('edit with text', variant='primary', elem_id='clip_edit')
        with gr.Accordion('advanced', open=False), gr.Row():
            T = gr.Dropdown(list(T_CHOICES), value=default_T, label='T: DDIM steps (the paper: 100)',
                            elem_id='T')
            decoder = gr.Radio([('DDIM', 'ddim'), ('DPM-Solver++', 'dpm++2m')], value='ddim', label='decoder')
            blend = gr.Radio(['hard', 'feather'], value='hard', label='blend (face mask edge)')
        with gr.Row():
            status = gr.Markdown(elem_id='status')
            stop = gr.Button('stop', variant='stop', elem_id='stop', size='sm', scale=0, min_width=120)
        pick = gr.Dropdown([], label='result', elem_id='result_pick')
        with gr.Row():
            video = gr.Video(label='edit', elem_id='result_video', interactive=False)
            side = gr.Video(label='original | edit', elem_id='side_by_side', interactive=False)
        with gr.Row():
            files = gr.File(label='downloads: edit, side by side, frames (zip), config', file_count='multiple',
                            interactive=False, elem_id='downloads')
            config = gr.Textbox(label='config.json', lines=12, max_lines=12, elem_id='config', buttons=['copy'])
        results = gr.State({})

        range_in = [start, end, cap]
        preview_out = [frame_img, crop_img, preview_md]
        def preview_error(msg):
            return None, None, msg

        kw = {'concurrency_id': 'preview', 'concurrency_limit': 1}
        e1 = upload.upload(guarded(on_upload, preview_error), [upload] + range_in, preview_out, **kw)
        e2 = sample.click(guarded(on_sample, preview_error), range_in, preview_out, **kw)
        e3 = preview_btn.click(guarded(on_preview, preview_error), range_in, preview_out, **kw)
        edit_out = [status, pick, video, side, files, config, results]
        def edit_error(msg):
            return (msg,) + (gr.update(),) * 6

        kw = {'concurrency_id': 'gpu', 'concurrency_limit': 1}
        advanced = [T, decoder, blend]
        e4 = edit_btn.click(guarded(on_edit, edit_error), [attributes, scale, extra] + advanced + range_in, edit_out,
                            **kw)
        e5 = clip_btn.click(guarded(on_clip, edit_error), [src, trg, clip_scale, clip_extra, clip_iters] + advanced
                            + range_in, edit_out, **kw)
        pick.input(on_pick, [pick, results], [video, side, files, config])
        stop.click(on_stop, None, None, cancels=[e1, e2, e3, e4, e5], concurrency_limit=None)
        page.unload(on_unload)
    return page


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        max_bytes = parse_size(args.max_upload)
    except ValueError as e:
        raise SystemExit(f'--max_upload: {e}') from None
    try:
        logins = read_logins(args.auth_file) if args.auth_file else None
    except ValueError as e:
        raise SystemExit(f'--auth_file: {e}') from None
    if (args.share or args.host not in ('127.0.0.1', 'localhost', '::1')) and not logins:
        log.warning('warning: the page is reachable from other machines without a login; --auth_file asks for one')
    root = Path(tempfile.mkdtemp(prefix='dva-demo-', dir=args.tmp_dir))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill`, docker stop: the folder goes too
    os.environ['GRADIO_TEMP_DIR'] = str(root / 'gradio')  # the web server's copies of uploads stay in `root` too
    cfg = EditConfig(checkpoint=args.checkpoint, cls_checkpoint=args.cls_checkpoint, clip_weights=args.clip_weights,
                     template=args.template, pretrained_dir=args.pretrained_dir, device=args.device,
                     precision=args.precision, T=args.T,
                     batch_size=args.batch_size if args.batch_size == 'auto' else int(args.batch_size))
    if args.random_weights:
        cfg = random_weights(cfg, root / 'weights')
    from editing.api import EditError

    try:
        demo = Demo(cfg, root, max_bytes, args.max_frames, args.session_ttl, args.max_edits, args.sample)
    except EditError as e:
        raise SystemExit(str(e)) from None
    atexit.register(demo.shutdown)
    demo.sessions.start_sweeper()
    gr.set_static_paths([str(demo.sessions.root)])  # results are served from the session folders, not copied
    page = build_page(demo, args.T)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=max_bytes,
                show_error=False, auth=logins)


if __name__ == '__main__':
    main(sys.argv[1:])
