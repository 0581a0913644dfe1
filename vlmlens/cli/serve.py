"""``serve``: the dashboard (``python app.py`` is this command).

Serves on 127.0.0.1 without a share link and without remote model code unless asked.
"""
from __future__ import annotations

import sys

from .common import add_model_args, command


@command("serve", "the dashboard in the browser (python app.py): one model, the cached runs, studies")
def cmd_serve(args) -> int:
    from ..ui import build_demo

    demo = build_demo(args.model, device=args.device, dtype=args.dtype, runs_dir=args.runs,
                      trust_remote_code=args.trust_remote_code, no_model=args.no_model, time_limit=args.time_limit,
                      max_image_side=args.max_image_side, studies=args.study, adapter=args.adapter,
                      datasets=args.datasets, study_time_limit=args.study_time_limit)
    holder = demo.dashboard.holder
    if holder.off_reason:
        print(f"note: {holder.off_reason}", file=sys.stderr)
    demo.queue(default_concurrency_limit=2).launch(server_name=args.host, server_port=args.port, share=args.share,
                                                   max_file_size=f"{args.max_upload_mb:g}mb", css=demo.vl_css, js=demo.vl_js)
    return 0


def _configure(p) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to serve on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--runs", default="cached_runs", help="folder of saved runs (opened in the Runs tab)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    p.add_argument("--no-model", action="store_true", help="serve cached runs only (teaching mode)")
    p.add_argument("--time-limit", type=float, default=120.0,
                   help="seconds one capture may generate before it stops with what it has (default 120)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image upload accepted (default 20 MB)")
    p.add_argument("--study", default="studies",
                   help="a study directory (python -m vlmlens study --out DIR), or a folder of them: the Study tab"
                        " opens them, and writes the studies it runs there (default: studies/)")
    p.add_argument("--datasets", default=None, help="a folder of datasets the Study tab may run (default: the shipped"
                   " ones in assets/datasets)")
    p.add_argument("--study-time-limit", type=float, default=600.0,
                   help="seconds a study run from the Study tab may take before it stops (its rows are kept)")
    p.add_argument("--max-image-side", type=int, default=1344,
                   help="uploads larger than this (pixels, long side) are scaled down before the model sees them")


cmd_serve.configure = _configure
