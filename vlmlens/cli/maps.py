"""``maps``: do the heatmaps predict what the answer depends on? (deletion / insertion curves)."""
from __future__ import annotations

import json

from ..errors import InputError
from .common import add_model_args, check_out_dir, command, load_from_args, progress_bar, write_html


def _parse_maps(text: str) -> list[tuple[str, int | None]]:
    from ..vocabulary import MAP_KINDS

    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        kind, _, layer = part.rpartition("@") if "@" in part else (part, "", "")
        kind = kind.strip()
        if kind not in MAP_KINDS:
            raise InputError(f"unknown map {kind!r} in --maps; expected {', '.join(MAP_KINDS)}, each with an"
                             " optional @LAYER (e.g. attention@2,LLaVA-CAM@2,patch lens@4)")
        try:
            out.append((kind, int(layer) if layer.strip() else None))
        except ValueError:
            raise InputError(f"--maps: the layer after @ must be a whole number, got {layer!r}") from None
    if not out:
        raise InputError("--maps is empty")
    return out


@command("maps", "do the heatmaps (attention, LLaVA-CAM, patch lens) predict what the answer depends on?"
         " deletion / insertion curves against random orders")
def cmd_maps(args) -> int:
    from ..capture import check_max_new_tokens, check_prompt
    from ..experiments.map_report import check_maps
    from ..images import load_image

    if (args.image is None) == (args.scene is None):
        raise InputError("give --image, or --scene SEED (a shapes-world scene, whose objects' places are known)")
    maps = _parse_maps(args.maps)
    check_prompt(args.prompt)
    check_max_new_tokens(args.max_new_tokens)
    scene = None
    if args.scene is not None:
        from ..tiny.scenes import make_scene

        if args.scene < 0:
            raise InputError(f"--scene must be a seed >= 0, got {args.scene}")
        scene = make_scene(args.scene)
        image = scene.image
    else:
        image = load_image(args.image)
    out = check_out_dir(args.out, "maps.json") if args.out else None
    lm = load_from_args(args)
    for _, layer in maps:
        top = lm.n_layers if _ == "patch lens" else lm.n_layers - 1
        if layer is not None and not 0 <= layer <= top:
            raise InputError(f"--maps: layer {layer} is out of range for {_} (0..{top} on this model)")
    rep = check_maps(lm, image, args.prompt, maps=maps, max_new_tokens=args.max_new_tokens, target=args.target,
                     separator=args.separator, steps=args.steps,
                     n_random=args.random, max_forwards=args.max_forwards, scene=scene, progress=progress_bar())
    print(f"{rep.model}: answer {rep.answer.strip()!r}; {rep.forwards} forwards, {rep.seconds:.0f} s")
    if rep.obj:
        print(f"the asked object: {rep.obj}")
    elif scene is not None:
        print(f"no pointing game: the prompt names no single object of scene {args.scene}"
              f" ({'; '.join(o.describe() for o in scene.objects)})")
    print()
    for c in rep.checks:
        print(f"- {c.statement}")
    print()
    print(rep.table().markdown())
    if out is not None:
        from ..figures.maps import fig_map_check

        out.mkdir(parents=True, exist_ok=True)
        (out / "maps.json").write_text(json.dumps(rep.to_json(), indent=1))
        (out / "maps.csv").write_text(rep.table().csv())
        write_html(fig_map_check(rep.checks), out / "fig_maps.html")
        print(f"\nsaved: {out}/maps.json, maps.csv, fig_maps.html")
    return 0


def _configure_maps(p):
    from ..vocabulary import MAP_MAX_FORWARDS, MAP_RANDOM, MAP_STEPS

    add_model_args(p)
    p.add_argument("--image", default=None, help="image file")
    p.add_argument("--scene", type=int, default=None, help="a shapes-world scene seed instead of --image: the"
                   " pointing game then checks each map's peak against the object the prompt asks about")
    p.add_argument("--prompt", required=True, help="question about the image")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--maps", default="attention,LLaVA-CAM,patch lens",
                   help="comma-separated KIND[@LAYER]; KIND attention, LLaVA-CAM or patch lens (default layer: the"
                   " middle one)")
    p.add_argument("--target", default="output", choices=("output", "answer"), help="what is scored: the whole"
                   " output (default) or only the answer after --separator")
    p.add_argument("--separator", default="answer:", help="what precedes the final answer (--target answer)")
    p.add_argument("--steps", type=int, default=MAP_STEPS, help="points on each curve after f = 0")
    p.add_argument("--random", type=int, default=MAP_RANDOM, help="random orders (19: the smallest p is 0.05)")
    p.add_argument("--max-forwards", type=int, default=MAP_MAX_FORWARDS, help="refuse a request that needs more forwards")
    p.add_argument("--out", default=None, help="directory for maps.json, maps.csv, fig_maps.html")


cmd_maps.configure = _configure_maps
