"""The dashboard's layout and event wiring: ``build_demo(...) -> gr.Blocks``."""
from __future__ import annotations

import gradio as gr

from ..capture import MAX_PROMPT_CHARS
from ..video import VIDEO_SUFFIXES
from ..experiments.engine import MODES
from ..vocabulary import METHOD_SYNTAX
from .callbacks import Dashboard, new_session
from .components import CheckedImage, CountSlider, Download, LayerSlider, VideoFile
from .inputs import prompt_choices
from .page import CSS, JS
from .run_views import HEATMAP_KINDS

# api names of the tab renderers (where the plain tab name is taken by the tab's action button)
INTERNAL = "undocumented"  # UI plumbing: named and callable, but not listed in the API page
#: the first screen's path for a lesson, in plain words (the precise definitions sit by each headline)
START_HERE = ("**Start here** — ① pick an example image and a prompt on the left, then **Run** (or read the run "
              "already shown) · ② **Overview**: what the model answered, and what we found, each finding marked with "
              "how it was measured · ③ **Heatmaps**: where each layer looks in the image — click a patch for its "
              "numbers, and *check the map* to see whether it really predicts what the answer depends on · "
              "④ **Truncation**: from which layer on the model no longer needs the image · ⑤ **Compute**: what "
              "that saves, and how pruning methods compare.")
#: every event that runs the model waits in one gradio queue, one at a time: the model runs one
#: request at a time anyway, and the queue shows each waiting user their position
MODEL_QUEUE = {"concurrency_id": "model", "concurrency_limit": 1}
VIEW_API = {"truncation": "truncation_view", "substitution": "substitution_view", "compute": "compute_view"}

def build_demo(model: str | None = "tiny-shapes", *, device: str = "auto", dtype: str = "auto",
               runs_dir="cached_runs", trust_remote_code: bool = False, no_model: bool = False,
               default_run: str | None = None, dashboard: Dashboard | None = None, **kwargs) -> gr.Blocks:
    """Build the Gradio app. ``dashboard`` (a :class:`Dashboard`) may be passed in; else one is
    made from the arguments and starts loading the model in the background."""
    dash = dashboard or Dashboard(model=model, device=device, dtype=dtype, runs_dir=runs_dir,
                                  trust_remote_code=trust_remote_code, no_model=no_model,
                                  default_run=default_run, **kwargs)
    from .inputs import EXAMPLES_DIR

    gr.set_static_paths([str(EXAMPLES_DIR)])
    teaching = dash.holder.state == "off"     # no model: every button that runs one is disabled
    live = {"interactive": not teaching}
    # no telemetry; gradio's cache of uploads and served files is swept hourly (files > 1 h old)
    with gr.Blocks(title="vlmlens", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        demo.dashboard = dash
        demo.vl_css, demo.vl_js = CSS, JS      # gradio 6 takes css and js at launch(): serve passes them
        sess = gr.State(new_session())
        active = gr.State("overview")
        gr.Markdown("## vlmlens — look inside a vision-language model's layers")
        gr.Markdown(START_HERE, elem_id="vl-start")
        status = gr.Markdown(dash.holder.status_markdown(), label="model_status", elem_id="vl-model-status")
        timer = gr.Timer(1.0, active=dash.holder.state in ("loading", "idle"))
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                image = CheckedImage(label="Image", type="filepath", image_mode=None, format="png",
                                     sources=["upload", "clipboard"], height=260, elem_id="vl-image")
                gallery = gr.Gallery(value=[(e["file"], f"seed {e.get('seed', '')}") for e in dash.examples],
                                     label="Examples (click one)", columns=5, height=150, allow_preview=False,
                                     elem_id="vl-gallery")
                with gr.Row():
                    scene_btn = gr.Button("New random scene", size="sm", elem_id="vl-scene", **live)
                truth = gr.Markdown("", label="ground_truth", elem_id="vl-truth")
                prompt_pick = gr.Dropdown(choices=prompt_choices(None), value=None, label="Example prompts",
                                          elem_id="vl-prompt-pick")
                prompt = gr.Textbox(label="Prompt (Enter runs)", placeholder="What color is the circle?", lines=1,
                                    max_lines=4, elem_id="vl-prompt", max_length=MAX_PROMPT_CHARS)
                max_new = CountSlider(1, 256, value=12, step=1, label="Max new tokens", elem_id="vl-max-new",
                                    info="reasoning traces of real models need 100-250")
                run_btn = gr.Button("Run", variant="primary", elem_id="vl-run", interactive=not teaching)
                with gr.Accordion("Video (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5)", open=False, elem_id="vl-video-box"):
                    video_in = VideoFile(label="Video file", file_types=list(VIDEO_SUFFIXES), type="filepath",
                                         elem_id="vl-video")
                    frames = CountSlider(2, 32, value=8, step=2, label="Frames sampled (evenly)", elem_id="vl-frames",
                                         info="two frames make one temporal slot of the model")
                    video_btn = gr.Button("Run on the video", elem_id="vl-run-video", interactive=not teaching)
                if teaching:
                    why = (dash.holder.off_reason or "no model loaded").rstrip(".")
                    gr.Markdown(f"_Teaching mode: {why}. Open a saved run in the Runs tab; running the model is off._",
                                elem_id="vl-teaching-note")
            with gr.Column(scale=3):
                with gr.Tabs(elem_id="vl-tabs"):
                    with gr.Tab("Overview", id="overview") as t_over:
                        with gr.Row():
                            run_image = gr.Image(label="The run's image", interactive=False, height=200, scale=1,
                                                 min_width=160, format="png", elem_id="vl-run-image")
                            with gr.Column(scale=4):
                                gen_md = gr.Markdown(label="generation", elem_id="vl-generation")
                                strip = gr.HTML(label="token_strip", elem_id="vl-strip")
                        headline = gr.Markdown(label="headline", elem_id="vl-headline")
                        over_fig = gr.Plot(label="Where the image is read: attention to it, layer by layer",
                                           elem_id="vl-overview-flow")
                        with gr.Accordion("Run info (what the API returns)", open=False):
                            info = gr.JSON(label="run_info", show_label=False, elem_id="vl-info")
                    with gr.Tab("Heatmaps", id="heatmaps") as t_heat:
                        with gr.Row():
                            layer = LayerSlider(0, max(1, dash.default_layers - 1), value=0, step=1,
                                                label="Decoder layer ℓ (attention read at ℓ)", elem_id="vl-layer")
                            query = gr.Dropdown(choices=[("last prompt token", 0)], value=0, label="Token (attention map)",
                                                elem_id="vl-query", allow_custom_value=True)
                            kind = gr.Radio(list(HEATMAP_KINDS), value="attention", label="Map", elem_id="vl-kind")
                        with gr.Row():
                            heat = gr.Plot(label="Heatmap", elem_id="vl-heatmap")
                            plens = gr.Plot(label="Patch lens (its own slider: the state each decoder layer reads)",
                                            elem_id="vl-patch-lens")
                        patch = gr.Textbox(label="Patch (row, col) — or click a cell of the heatmap", value="",
                                           elem_id="vl-patch", max_lines=1)
                        patch_md = gr.Markdown(elem_id="vl-patch-card")      # full width: a column per number
                        with gr.Row():
                            mapcheck_btn = gr.Button("Check this map: does it predict what the answer depends on?",
                                                     size="sm", elem_id="vl-map-check-btn")
                        mapcheck_md = gr.Markdown(elem_id="vl-map-check")
                        mapcheck_fig = gr.Plot(label="Map check: deletion / insertion curves",
                                               elem_id="vl-map-check-fig")
                        grid = gr.Plot(label="All layers", elem_id="vl-grid")
                        lens = gr.Plot(label="Logit lens", elem_id="vl-logit-lens")
                    with gr.Tab("Dynamics", id="dynamics") as t_dyn:
                        move = gr.Plot(label="How far the tokens move (decides visual stabilisation)",
                                       elem_id="vl-movement")
                        dyn = gr.Plot(label="Geometry across layers", elem_id="vl-dynamics")
                        span = gr.Radio(["image", "text", "generated"], value="image", label="CKA span")
                        cka = gr.Plot(label="Layer similarity (CKA)", elem_id="vl-cka")
                        with gr.Row():
                            method = gr.Radio(["pca", "umap"], value="pca", label="Token map method")
                            embed_btn = gr.Button("Draw token map", size="sm")
                        embed = gr.Plot(label="Token map", elem_id="vl-embed")
                        enc_dec = gr.Plot(label="The image across the vision tower's and the decoder's layers",
                                          elem_id="vl-enc-dec")
                    with gr.Tab("Attention flow", id="attention") as t_att:
                        stages_btn = gr.Button("Find the three stages (knockout windows)", size="sm",
                                               elem_id="vl-stages-btn", **live)
                        flow = gr.Plot(label="Attention share per layer", elem_id="vl-flow")
                        stages_md = gr.Markdown(label="stages", elem_id="vl-stages")
                        heads = gr.Plot(label="Per-head share", elem_id="vl-heads")
                        head_layer = gr.Dropdown(choices=[], label="Each head's map at decoder layer ℓ",
                                                 elem_id="vl-head-layer", allow_custom_value=True)
                        head_fig = gr.Plot(label="Per-head maps (last prompt token)", elem_id="vl-head-maps")
                        frames_fig = gr.Plot(label="Attention per temporal slot (video runs)", elem_id="vl-frames-fig")
                    with gr.Tab("Truncation", id="truncation") as t_trunc:
                        with gr.Row():
                            depths = gr.Dropdown(choices=[], multiselect=True, label="Depths (image cut from layer k on)",
                                                 elem_id="vl-depths", allow_custom_value=True)
                            mode = gr.Radio(list(MODES), value="drop", label="Mode", elem_id="vl-mode")
                            trunc_btn = gr.Button("Compare", variant="primary", elem_id="vl-compare", **live)
                            sweep_btn = gr.Button("Full sweep (every depth)", elem_id="vl-sweep-btn", **live)
                        gens = gr.HTML(label="generations", elem_id="vl-gens")
                        sweep_fig = gr.Plot(label="Truncation sweep", elem_id="vl-sweep")
                        pert_fig = gr.Plot(label="Reasoning-trace perturbation", elem_id="vl-perturb")
                        enc_btn = gr.Button("Encoder x decoder grid (vision layers run x decoder cut)", size="sm",
                                            elem_id="vl-enc-grid-btn", **live)
                        enc_fig = gr.Plot(label="Encoder x decoder depth", elem_id="vl-enc-grid")
                    with gr.Tab("Substitution / skipping", id="substitution") as t_sub:
                        with gr.Row():
                            sub_btn = gr.Button("Substitution matrix", size="sm", **live)
                            skip_btn = gr.Button("Layer-skip scan", size="sm", **live)
                        sub_fig = gr.Plot(label="Substitution matrix", elem_id="vl-subst")
                        skip_fig = gr.Plot(label="Layer-skip scan", elem_id="vl-skip")
                    with gr.Tab("Compute", id="compute") as t_comp:
                        measure_btn = gr.Button("Measure compute (times each depth with the model)", size="sm", **live)
                        comp_fig = gr.Plot(label="FLOPs / KV cache / latency per depth", elem_id="vl-compute")
                        gr.Markdown("#### Token pruning: which image tokens can go, where, at what cost")
                        with gr.Row():
                            prune_methods = gr.Textbox(value="default", label="Methods", info=METHOD_SYNTAX, scale=4,
                                                       elem_id="vl-prune-methods")
                            prune_btn = gr.Button("Compare pruning methods", variant="primary", scale=1,
                                                  elem_id="vl-prune-btn", **live)
                        prune_md = gr.Markdown(label="pruning", elem_id="vl-prune-md")
                        prune_pick = gr.Dropdown(choices=[], label="Show the tokens kept by", elem_id="vl-prune-pick",
                                                 allow_custom_value=True)
                        prune_fig = gr.Plot(label="Image tokens kept per layer", elem_id="vl-prune-fig")
                    with gr.Tab("Study", id="study") as t_study:
                        with gr.Row():
                            study_pick = gr.Dropdown(choices=dash.study_names(), value=(dash.study_names() or [None])[0],
                                                     label="Study", info="directories under --study", scale=3,
                                                     elem_id="vl-study-pick", allow_custom_value=True)
                            study_btn = gr.Button("Open", scale=1, elem_id="vl-study-open")
                        study_md = gr.Markdown(label="study", elem_id="vl-study-md")
                        study_fig = gr.Plot(label="Score vs depth", elem_id="vl-study-fig")
                        study_row = gr.Dropdown(choices=[], label="Row", elem_id="vl-study-row", allow_custom_value=True)
                        study_html = gr.HTML(label="row outputs", elem_id="vl-study-row-html")
                        study_csv = Download(label="study.csv (every task x depth / method, with intervals)",
                                             elem_id="vl-study-csv")
                        with gr.Accordion("Run a study on the loaded model", open=False):
                            with gr.Row():
                                sdata = gr.Dropdown(choices=dash.dataset_names(), value=dash.default_dataset(),
                                                    label="Dataset", info="folders under --datasets", elem_id="vl-srun-data")
                                srows = CountSlider(1, 200, value=40, step=1, label="Rows (the first N)", elem_id="vl-srun-rows")
                                sdepths = gr.Textbox(label="Depths k", placeholder="all; or e.g. 0,2,4,8",
                                                     elem_id="vl-srun-depths")
                            with gr.Row():
                                sbatch = CountSlider(1, 32, value=8, step=1, label="Batch size", elem_id="vl-srun-batch")
                                snew = CountSlider(1, 64, value=48, step=1, label="Max new tokens", elem_id="vl-srun-new")
                                sname = gr.Textbox(label="Study name", value="my-study", elem_id="vl-srun-name")
                                srun = gr.Button("Run study", variant="primary", elem_id="vl-srun-btn", **live)
                    with gr.Tab("Runs", id="runs") as t_runs:
                        with gr.Row():
                            run_list = gr.Dropdown(choices=dash.runs.preferred_order(), value=dash.default_run,
                                                   label="Saved runs", info=f"in {dash.runs.path}", elem_id="vl-run-list",
                                                   allow_custom_value=True)
                            open_btn = gr.Button("Open", elem_id="vl-open")
                            refresh_btn = gr.Button("Refresh list", size="sm")
                        names_json = gr.JSON(visible=False, label="run_names")
                        runs_table = gr.Markdown(dash.runs.table_markdown(), label="runs_table", elem_id="vl-runs-table")
                        mine = gr.Dropdown(choices=[], label="This session's runs", elem_id="vl-mine", allow_custom_value=True)
                        with gr.Row():
                            save_name = gr.Textbox(label="Save current run as", placeholder="my-run", elem_id="vl-save-name")
                            save_btn = gr.Button("Save", elem_id="vl-save")
                        save_msg = gr.Markdown(label="save_message")
                        with gr.Row():        # prepared as this tab opens (each figure also saves itself: SVG)
                            dl_zip = Download(label="Run (zip)", elem_id="vl-dl-zip")
                            dl_csv = Download(label="Metrics (CSV)", elem_id="vl-dl-csv")
                            dl_html = Download(label="Figures (HTML)", elem_id="vl-dl-html")
                        dl_btn = gr.Button("Prepare the downloads again", size="sm", elem_id="vl-downloads")
                        downloads = [dl_zip, dl_csv, dl_html]
                        gr.Markdown("#### Compare the current run with another")
                        with gr.Row():
                            other_pick = gr.Dropdown(choices=dash.runs.preferred_order(), value=None,
                                                     label="Other run (saved, or one of this session's)",
                                                     elem_id="vl-other", allow_custom_value=True)
                            compare_runs_btn = gr.Button("Compare", elem_id="vl-compare-runs")
                        compare_md = gr.Markdown(label="comparison", elem_id="vl-compare-md")
                        compare_flow = gr.Plot(label="Attention to the image, both runs", elem_id="vl-compare-flow")
                        compare_dyn = gr.Plot(label="Geometry across layers, both runs", elem_id="vl-compare-dyn")

        overview = [sess, info, gen_md, strip, headline]
        tab_outputs = {"heatmaps": [heat, grid, lens, plens], "dynamics": [move, dyn, cka, embed, enc_dec],
                       "attention": [flow, heads, stages_md, head_layer, head_fig, frames_fig],
                       "truncation": [gens, sweep_fig, pert_fig, enc_fig],
                       "substitution": [sub_fig, skip_fig], "compute": [comp_fig, prune_md, prune_pick, prune_fig]}
        all_tab_outputs = [c for cs in tab_outputs.values() for c in cs]

        def render_tab(sess_v, tab, layer_v, query_v, kind_v, span_v):
            """After a new run: redraw the visible tab, leave the others for their select event."""
            out = {c: gr.skip() for c in all_tab_outputs}
            if not dash.store.has((sess_v or {}).get("current")):
                return [out[c] for c in all_tab_outputs]
            calls = {"heatmaps": lambda: dash.heatmaps(sess_v, layer_v, query_v, kind_v),
                     "dynamics": lambda: dash.dynamics(sess_v, span_v), "attention": lambda: dash.attention(sess_v),
                     "truncation": lambda: dash.truncation_view(sess_v),
                     "substitution": lambda: dash.substitution_view(sess_v),
                     "compute": lambda: dash.compute_view(sess_v)}
            if tab in calls:
                out.update(zip(tab_outputs[tab], calls[tab]()))
            return [out[c] for c in all_tab_outputs]

        def after_run(ev, name):
            ev = ev.success(dash.sync_controls, [sess, layer],
                            [layer, query, depths, mine, run_image, truth, image, prompt, max_new, other_pick],
                            api_name=f"{name}_controls", show_progress="hidden", api_visibility=INTERNAL)
            ev = ev.success(render_tab, [sess, active, layer, query, kind, span], all_tab_outputs,
                            api_name=f"{name}_render", show_progress="hidden", api_visibility=INTERNAL)
            ev.success(dash.overview_figure, [sess, active], over_fig, api_name=f"{name}_overview_figure",
                       show_progress="hidden", api_visibility=INTERNAL)
            return ev.success(dash.downloads_if_shown, [sess, active], downloads, api_name=f"{name}_downloads",
                              api_visibility=INTERNAL)        # the Runs tab's files always follow the run shown

        timer.tick(dash.model_status, None, [status, timer], api_name="model_status", show_progress="hidden",
                   api_visibility=INTERNAL)
        gallery.select(dash.pick_example, prompt, [image, prompt_pick, truth, prompt], api_name="pick_example",
                       api_visibility=INTERNAL)
        scene_btn.click(dash.new_scene, None, [image, prompt_pick, truth], api_name="random_scene")
        image.upload(dash.image_uploaded, image, [prompt_pick, truth], api_name="image_uploaded",
                     show_progress="hidden", api_visibility=INTERNAL)
        prompt_pick.input(dash.pick_prompt, prompt_pick, prompt, api_name="pick_prompt", show_progress="hidden",
                          api_visibility=INTERNAL)
        # one progress bar for a capture, over the generated text (not one on each overview output)
        one_bar = {"show_progress_on": [gen_md], **MODEL_QUEUE}
        after_run(run_btn.click(dash.capture, [image, prompt, max_new, sess], overview, api_name="capture",
                                **one_bar), "capture")
        after_run(video_btn.click(dash.capture_video, [video_in, frames, prompt, max_new, sess], overview,
                                  api_name="capture_video", **one_bar), "capture_video")
        after_run(prompt.submit(dash.capture, [image, prompt, max_new, sess], overview, api_name="capture_submit",
                                api_visibility=INTERNAL, **one_bar), "capture_submit")
        after_run(demo.load(dash.open_default, sess, overview, api_name="open_default", api_visibility=INTERNAL),
                  "open_default")
        after_run(open_btn.click(dash.load_run, [run_list, sess], overview, api_name="load_run"), "load_run")
        after_run(mine.input(dash.switch_run, [mine, sess], overview, api_name="switch_run"), "switch_run")
        refresh_btn.click(dash.list_runs, None, [run_list, names_json, runs_table], api_name="list_runs")
        save_btn.click(dash.save_run, [save_name, sess], [save_msg, run_list, runs_table], api_name="save_run")
        dl_btn.click(dash.downloads, sess, downloads, api_name="downloads")
        compare_runs_btn.click(dash.compare_runs, [sess, other_pick], [compare_md, compare_flow, compare_dyn],
                               api_name="compare_runs")

        layer.change(dash.heatmap_layer, [sess, layer, query, kind], heat, api_name="heatmap_layer",
                     show_progress="hidden", trigger_mode="always_last")
        patch.change(dash.patch_card, [sess, patch, query], patch_md, api_name="patch_card", show_progress="hidden",
                     trigger_mode="always_last")
        for ctl, nm in ((query, "heatmaps_query"), (kind, "heatmaps_kind")):
            ctl.input(dash.heatmaps, [sess, layer, query, kind], tab_outputs["heatmaps"], api_name=nm,
                      api_visibility=INTERNAL)
        span.input(dash.dynamics, [sess, span], tab_outputs["dynamics"], api_name="dynamics_span", api_visibility=INTERNAL)
        embed_btn.click(dash.token_map, [sess, method], embed, api_name="token_map")
        head_layer.input(dash.head_maps, [sess, head_layer], head_fig, api_name="head_maps")
        trunc_btn.click(dash.truncate, [sess, depths, mode], [gens, sweep_fig, pert_fig, enc_fig, headline],
                        api_name="truncate", **MODEL_QUEUE)
        sweep_btn.click(dash.sweep, [sess, mode], [gens, sweep_fig, pert_fig, enc_fig, headline], api_name="sweep",
                        **MODEL_QUEUE)
        enc_btn.click(dash.encoder_grid, sess, enc_fig, api_name="encoder_grid", **MODEL_QUEUE)
        measure_btn.click(dash.measure_compute, sess, [comp_fig, headline], api_name="measure_compute",
                          **MODEL_QUEUE)
        study_btn.click(dash.study_open, study_pick, [study_md, study_fig, study_row, study_html, study_csv],
                        api_name="study_open")
        study_row.input(dash.study_item, [study_pick, study_row], study_html, api_name="study_item")
        srun.click(dash.study_run, [sdata, srows, sdepths, sbatch, snew, sname],
                   [study_pick, study_md, study_fig, study_row, study_html, study_csv], api_name="study_run",
                   **MODEL_QUEUE)
        t_study.select(dash.study_list, None, study_pick, api_name="study_list", show_progress="hidden",
                       api_visibility=INTERNAL)
        mapcheck_btn.click(dash.map_check, [sess, layer, query, kind], [mapcheck_md, mapcheck_fig],
                           api_name="map_check", **MODEL_QUEUE)
        prune_btn.click(dash.prune_compare, [sess, prune_methods], [prune_md, prune_pick, prune_fig],
                        api_name="prune_compare", **MODEL_QUEUE)
        prune_pick.input(dash.prune_view, [sess, prune_pick], prune_fig, api_name="prune_view")
        stages_btn.click(dash.find_stages, sess, [flow, heads, stages_md, headline], api_name="find_stages",
                         **MODEL_QUEUE)
        sub_btn.click(dash.substitution, sess, [sub_fig, skip_fig], api_name="substitution", **MODEL_QUEUE)
        skip_btn.click(dash.layer_skip, sess, [sub_fig, skip_fig], api_name="layer_skip", **MODEL_QUEUE)

        tab_calls = {t_heat: ("heatmaps", dash.heatmaps, [sess, layer, query, kind]),
                     t_dyn: ("dynamics", dash.dynamics, [sess, span]),
                     t_att: ("attention", dash.attention, [sess]),
                     t_trunc: ("truncation", dash.truncation_view, [sess]),
                     t_sub: ("substitution", dash.substitution_view, [sess]),
                     t_comp: ("compute", dash.compute_view, [sess])}
        for tab, (name, fn, ins) in tab_calls.items():
            tab.select(lambda n=name: n, None, active, api_name=f"select_{name}", show_progress="hidden", queue=False,
                       api_visibility=INTERNAL)
            tab.select(fn, ins, tab_outputs[name], api_name=VIEW_API.get(name, name))
        t_runs.select(dash.list_runs, None, [run_list, names_json, runs_table], api_name="runs_refresh",
                      show_progress="hidden", api_visibility=INTERNAL)     # the list is never stale
        t_runs.select(dash.downloads_if_shown, sess, downloads, api_name="downloads_on_open", api_visibility=INTERNAL)
        t_over.select(dash.overview_figure, sess, over_fig, api_name="overview_figure", show_progress="hidden",
                      api_visibility=INTERNAL)
        for tab, name in ((t_over, "overview"), (t_runs, "runs"), (t_study, "study")):
            tab.select(lambda n=name: n, None, active, api_name=f"select_{name}", show_progress="hidden", queue=False,
                       api_visibility=INTERNAL)
    return demo
