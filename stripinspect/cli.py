"""The ``stripinspect`` command: one entry point, one subcommand per job.

Start-up problems exit non-zero with one line on stderr. Offline subcommands (export, fit,
demo) import torch lazily, so the runtime ones never need it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, load_config
from pipeline.errors import StripinspectError

DEFAULT_CONFIG = Path("config.yaml")


def _config(path: Path | None) -> Config:
    if path is None:
        return load_config(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else Config()
    return load_config(path)


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.path if args.path is not None else DEFAULT_CONFIG
    load_config(path)
    print(f"{path}: ok")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from export.onnx_export import export_backbone

    cfg = _config(args.config)
    info = export_backbone(cfg.backbone, args.out, threads=cfg.runtime.onnx_threads)
    print(
        f"exported {info.backbone} ({'+'.join(info.layers)}, {info.embedding_dim} dims, stride "
        f"{info.feature_stride}) to {args.out / 'model.onnx'}; onnxruntime vs torch relative error "
        f"{info.verified_relative_error:.1e}"
    )
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from export.fit import fit

    result = fit(
        backend=args.backend,
        data=args.data,
        out=args.out,
        cfg=_config(args.config),
        model_dir=args.model,
        encoder=args.encoder,
        progress=not args.quiet,
    )
    print(result.summary)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from export.trained import train_to_file

    te = train_to_file(
        backend=args.backend, data=args.data, out=args.out, cfg=_config(args.config), progress=not args.quiet
    )
    h = te.hist
    print(
        f"encoder {args.out}: {args.backend} trained on {te.images} images, {len(h.loss)} steps in "
        f"{h.seconds:.1f} s on {te.training['device']} (stop: {h.stop_reason}), SSL accuracy "
        f"{te.final_ssl_accuracy:.3f}; `stripinspect fit --backend {args.backend} --encoder {args.out}` fits its banks"
    )
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from calibration.ensemble import make_ensemble

    cfg = _config(args.config)
    m = make_ensemble(
        bundles=args.bundles, normal=args.normal, out=args.out, cfg=cfg, every=args.every, progress=not args.quiet
    )
    print(
        f"ensemble {args.out}: {len(m.members)} members, normal-score statistics from {m.fitted_on.images} images of "
        f"{args.normal}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from calibration.evaluate import evaluate

    cfg = _config(args.config)
    metrics = evaluate(bundle=args.bundle, data=args.data, out=args.out, cfg=cfg, progress=not args.quiet)
    print(
        json.dumps(
            {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "images", "seconds_per_image")},
            indent=2,
        )
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from stripinspect.demo import run_demo

    cfg = _config(args.config)
    run_demo(cfg=cfg, out=args.out, progress=not args.quiet)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.service.run import run

    return run(_config(args.config), quiet=args.quiet, log_json=args.log_json)


def cmd_proxy(args: argparse.Namespace) -> int:
    from pipeline.coil.run import run_proxy

    return run_proxy(_config(args.config).coil, quiet=args.quiet)


def cmd_bridge(args: argparse.Namespace) -> int:
    from pipeline.bridge.run import run_bridge

    return run_bridge(_config(args.config), quiet=args.quiet, log_json=args.log_json)


def cmd_ui(args: argparse.Namespace) -> int:
    from pipeline.ui.run import run_ui

    return run_ui(_config(args.config), quiet=args.quiet, log_json=args.log_json)


def _password(prompt: str) -> str:
    """From a prompt on a terminal, else one line of stdin (scripts, Ansible)."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(prompt)
    return sys.stdin.readline().rstrip("\n")


def cmd_ui_user(args: argparse.Namespace) -> int:
    from pipeline.transport.users import add_user

    add_user(args.users_file, args.name, _password(f"password for {args.name}: "), role=args.role)
    print(f"{args.users_file}: user {args.name} set ({args.role}, scrypt hash)")
    return 0


def cmd_ui_token(args: argparse.Namespace) -> int:
    from pipeline.transport.users import add_token

    token = add_token(args.tokens_file, args.name, role=args.role)
    # The token itself on stdout, alone (for a script to capture); where it went on stderr.
    print(token)
    print(f"{args.tokens_file}: token {args.name} set ({args.role}); only its SHA-256 is kept", file=sys.stderr)
    return 0


def cmd_coil_service(args: argparse.Namespace) -> int:
    from pipeline.coil.run import run_coil_service

    return run_coil_service(_config(args.config).coil, quiet=args.quiet)


def cmd_coil_report(args: argparse.Namespace) -> int:
    from pipeline.coil.records import CoilRecords
    from pipeline.coil.report import write_report
    from pipeline.coil.service import coil_summary

    cfg = _config(args.config).coil
    if not args.db.is_file():
        raise StripinspectError(f"{args.db}: no coil records database")
    records = CoilRecords(
        path=args.db, synchronous=cfg.db.synchronous, max_age_days=cfg.db.max_age_days, max_coils=cfg.db.max_coils
    )
    try:
        files = write_report(coil_summary(records, args.coil, cfg), args.out)
    finally:
        records.close()
    print(json.dumps({"pdf": str(files.pdf), "png": str(files.png), "json": str(files.json)}))
    return 0


def _client_keys(args: argparse.Namespace) -> Any:
    from pipeline.transport.listen import ClientKeys

    if (args.client_key is None) != (args.server_key is None):
        raise ConfigError("--client-key and --server-key go together (CURVE)")
    return None if args.client_key is None else ClientKeys(client_key=args.client_key, server_key=args.server_key)


def cmd_keys(args: argparse.Namespace) -> int:
    if args.opcua_user is not None:
        from pipeline.transport.users import add_user

        if args.users_file is None:
            raise ConfigError("--opcua-user needs --users-file (bridge.opcua.users_file)")
        add_user(args.users_file, args.opcua_user, _password(f"password for {args.opcua_user}: "))
        print(f"{args.users_file}: user {args.opcua_user} set (scrypt hash)")
        return 0
    if args.out is None:
        raise ConfigError("keys needs --out DIR (or --opcua-user NAME --users-file FILE)")
    if args.opcua:
        from pipeline.bridge.certs import create_opcua_keys

        create_opcua_keys(args.out, clients=args.clients, hostname=args.hostname)
        print(f"{args.out}: OPC UA server certificate and key, client certificates in {args.out / 'clients'}")
        print(f"set bridge.opcua.certs_dir: {args.out}; give each client its clients/<name>_cert.der and _key.pem")
        return 0
    from pipeline.transport.security import create_keys

    create_keys(args.out, args.clients)
    print(f"{args.out}: server certificate, {len(args.clients)} client certificate(s) in {args.out / 'clients'}")
    print(f"set daemon.curve_keys: {args.out}; give each client its clients/<name>.key_secret and server.key")
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    from pipeline.transport.listen import deadline, json_line, listen

    out = open(args.out, "a", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
    try:
        report = listen(
            endpoint=args.endpoint,
            topics=tuple(args.topics),
            on_message=lambda t, h: print(json_line(t, h), file=out, flush=True),
            stop=deadline(args.seconds),
            control_endpoint=args.control,
            since=args.since,
            keys=_client_keys(args),
        )
    finally:
        if out is not sys.stdout:
            out.close()
    for topic, want, got in report.gaps:
        print(f"gap on {topic}: expected seq {want}, got {got}", file=sys.stderr)
    print(
        f"received {report.received}, {report.recovered} alert(s) recovered from the journal, "
        f"last alert seq {report.last_alert}, {len(report.gaps)} gap(s)",
        file=sys.stderr,
    )
    return 0 if not report.gaps else 3


def cmd_reject_sim(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pipeline.transport.listen import deadline
    from pipeline.transport.reject import simulate_reject

    report = simulate_reject(
        endpoint=args.endpoint,
        speed_m_s=args.speed,
        distance_m=args.distance,
        lead_s=args.lead,
        stop=deadline(args.seconds),
        on_firing=lambda f: print(json.dumps(asdict(f)), flush=True),
    )
    worst = "-" if report.smallest_margin_s is None else f"{report.smallest_margin_s:.3f} s"
    print(
        f"alerts {report.alerts}, too late {report.late}, smallest margin {worst}, sequence gaps {report.gaps}",
        file=sys.stderr,
    )
    return 0 if not report.late and not report.gaps else 3


def cmd_calibrate_flatfield(args: argparse.Namespace) -> int:
    from calibration.flatfield import calibrate_flatfield

    cal = calibrate_flatfield(dark=args.dark, white=args.white, out_dir=args.out, max_noise=args.max_noise)
    report = cal.report
    print(
        f"flat-field {cal.path}: {report.lines_dark} dark and {report.lines_white} white lines, column profile CV "
        f"{100 * report.profile_cv_before:.2f} % -> {100 * report.profile_cv_after:.2f} %; report "
        f"{args.out / 'flatfield.json'}, plot {args.out / 'flatfield.png'}"
    )
    return 0


def cmd_calibrate_scale(args: argparse.Namespace) -> int:
    from calibration.scale import calibrate_scale_from_files

    result = calibrate_scale_from_files(
        target=args.target,
        target_width_mm=args.target_width_mm,
        mm_per_pulse=args.mm_per_pulse,
        divider=args.divider,
        line_rate_hz=args.line_rate,
        speed_m_per_min=args.speed,
        out_dir=args.out,
    )
    print(json.dumps(result))
    return 0


def cmd_calibrate_thresholds(args: argparse.Namespace) -> int:
    from calibration.thresholds import calibrate_thresholds_from_config

    cal = calibrate_thresholds_from_config(
        cfg=_config(args.config),
        bundle=args.bundle,
        out_dir=args.out,
        bands=args.bands,
        alarms_per_km=args.alarms_per_km,
        min_area_mm2=args.min_area_mm2,
        data=args.data,
        frames=args.frames,
        first_line=args.first_line,
        labelled=args.labelled,
        progress=not args.quiet,
    )
    print(
        f"{cal.metres:.1f} m of normal strip, {args.bands} bands: thresholds "
        f"{', '.join(f'{t:.2f}' for t in cal.result.thresholds)} written to {args.bundle}; report {args.out}"
    )
    if cal.labelled is not None:
        r = cal.labelled
        print(
            f"labelled {args.labelled}: false positives {100 * r['false_positive_rate_per_image']:.1f} % of "
            f"{r['normal_images']} normal images, detected {100 * r['detection_rate']:.1f} % of "
            f"{r['defect_images']} defect images; best image F1 {r['best_f1']:.3f} at "
            f"{r['best_f1_image_threshold']:.2f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stripinspect", description="Steel strip surface inspection (PatchCore).")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("path", nargs="?", type=Path, default=None, help="config file (default ./config.yaml)")
    c.set_defaults(func=cmd_check_config)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", type=Path, default=None, help="config file (default ./config.yaml)")
        sp.add_argument(
            "--quiet", action="store_true", help="no progress bars (run: only warnings, errors and the summary)"
        )

    e = sub.add_parser("export", help="export the configured backbone to ONNX and verify it")
    with_config(e)
    e.add_argument("--out", type=Path, required=True, help="folder for model.onnx and model.json")
    e.set_defaults(func=cmd_export)

    f = sub.add_parser("fit", help="fit a memory bank on a folder of normal images, write a bundle")
    with_config(f)
    f.add_argument("--data", type=Path, required=True, help="folder of defect-free images")
    f.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    f.add_argument("--model", type=Path, default=None, help="folder from `export` (default: export now)")
    f.add_argument(
        "--backend",
        choices=["patchcore", "svdd", "msp"],
        default="patchcore",
        help="patchcore: ImageNet CNN + coreset bank; svdd: train a Patch SVDD encoder on the data (config svdd:); "
        "msp: train multi-scale patch encoders, Tsai et al. 2022 (config msp:)",
    )
    f.add_argument(
        "--encoder",
        type=Path,
        default=None,
        help="svdd/msp: an encoder file from `stripinspect train` (default: train now)",
    )
    f.set_defaults(func=cmd_fit)

    tr = sub.add_parser(
        "train", help="train a patch encoder (svdd or msp) into a file, e.g. on a GPU machine; fit --encoder uses it"
    )
    with_config(tr)
    tr.add_argument("--backend", choices=["svdd", "msp"], required=True, help="config svdd: or msp: settings")
    tr.add_argument("--data", type=Path, required=True, help="folder of defect-free images")
    tr.add_argument("--out", type=Path, required=True, help="encoder file to write (.pt); curves beside it")
    tr.set_defaults(func=cmd_train)

    n = sub.add_parser(
        "ensemble", help="combine bundles: each map normalised by its normal-score statistics, then averaged"
    )
    with_config(n)
    n.add_argument("--bundles", type=Path, nargs="+", required=True, help="member bundle folders (2 or more)")
    n.add_argument("--normal", type=Path, required=True, help="folder of normal images for the statistics")
    n.add_argument("--every", type=int, default=1, help="use every N-th normal image")
    n.add_argument("--out", type=Path, required=True, help="ensemble folder to write (manifest.json)")
    n.set_defaults(func=cmd_ensemble)

    v = sub.add_parser("evaluate", help="score an MVTec-layout test set; write metrics, scores, overlays")
    with_config(v)
    v.add_argument("--bundle", type=Path, required=True)
    v.add_argument("--data", type=Path, required=True, help="folder with test/ and ground_truth/")
    v.add_argument("--out", type=Path, required=True, help="metrics.json path; scores.csv and overlays/ beside it")
    v.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("run", help="run the inspection daemon")
    with_config(r)
    r.add_argument(
        "--log-json", action="store_true", help="log one JSON object per line (services, journald); see --quiet"
    )
    r.set_defaults(func=cmd_run)

    px = sub.add_parser("proxy", help="fan the camera daemons' PUB streams into one XPUB endpoint (coil.cameras)")
    with_config(px)
    px.set_defaults(func=cmd_proxy)

    cs = sub.add_parser(
        "coil-service", help="merge every camera onto coil records; periodic defects, grading, coil reports"
    )
    with_config(cs)
    cs.set_defaults(func=cmd_coil_service)

    br = sub.add_parser("bridge", help="serve the plant: OPC UA, Modbus TCP and MQTT from the daemons' alerts")
    with_config(br)
    br.add_argument("--log-json", action="store_true", help="log one JSON object per line (services, journald)")
    br.set_defaults(func=cmd_bridge)

    ui = sub.add_parser("ui", help="serve the operator station (browser): live view, coil map, operator feedback")
    with_config(ui)
    ui.add_argument("--log-json", action="store_true", help="log one JSON object per line (services, journald)")
    ui.set_defaults(func=cmd_ui)

    uu = sub.add_parser("ui-user", help="add a station user or change its password and role (password prompted)")
    uu.add_argument("name", help="user name (1-64 letters, digits, '_', '.', '@', '-')")
    uu.add_argument("--role", choices=["viewer", "operator"], required=True, help="operator: may teach the model")
    uu.add_argument("--users-file", type=Path, required=True, help="ui.users_file (made with mode 0600)")
    uu.set_defaults(func=cmd_ui_user)

    ut = sub.add_parser("ui-token", help="issue an API token for the station (printed once, stored hashed)")
    ut.add_argument("name", help="who the token is for, e.g. mes")
    ut.add_argument("--role", choices=["viewer", "operator"], required=True)
    ut.add_argument("--tokens-file", type=Path, required=True, help="ui.tokens_file (made with mode 0600)")
    ut.set_defaults(func=cmd_ui_token)

    co = sub.add_parser("coil", help="coil records")
    co_sub = co.add_subparsers(dest="coil_cmd", required=True)
    cr = co_sub.add_parser("report", help="write a coil's report.pdf, map.png and report.json")
    with_config(cr)
    cr.add_argument("--db", type=Path, required=True, help="coil records database (coil.db.path)")
    cr.add_argument("--coil", required=True, help="coil ID")
    cr.add_argument("--out", type=Path, required=True, help="folder to write the report into")
    cr.set_defaults(func=cmd_coil_report)

    li = sub.add_parser("listen", help="print alerts from a running daemon as JSON lines; report sequence gaps")
    li.add_argument("endpoint", help="the daemon's PUB endpoint, e.g. tcp://127.0.0.1:5555")
    li.add_argument("--topics", nargs="+", default=["alert"], choices=["alert", "frame", "heartbeat", "coil"])
    li.add_argument("--out", type=Path, default=None, help="append JSON lines to this file")
    li.add_argument("--seconds", type=float, default=None, help="stop after this long")
    li.add_argument(
        "--control",
        default=None,
        help="the daemon's control endpoint: fill gaps in alert numbers from its journal (and --since)",
    )
    li.add_argument(
        "--since", type=int, default=None, help="with --control: first fetch every alert after this seq (the last seen)"
    )
    li.add_argument("--client-key", type=Path, default=None, help="CURVE: this client's .key_secret file")
    li.add_argument("--server-key", type=Path, default=None, help="CURVE: the daemon's server.key file")
    li.set_defaults(func=cmd_listen)

    ky = sub.add_parser(
        "keys",
        help="create a CURVE keys folder (daemon) or, with --opcua, OPC UA certificates (bridge); add OPC UA users",
    )
    ky.add_argument("--out", type=Path, default=None, help="keys folder to create")
    ky.add_argument("--clients", nargs="+", default=["plc"], help="names of client certificates to create")
    ky.add_argument("--opcua", action="store_true", help="X.509 certificates for the bridge's OPC UA server")
    ky.add_argument(
        "--hostname", default="127.0.0.1", help="with --opcua: the server's host name or address (certificate SAN)"
    )
    ky.add_argument("--opcua-user", default=None, help="add or replace this OPC UA user (password on stdin)")
    ky.add_argument("--users-file", type=Path, default=None, help="with --opcua-user: bridge.opcua.users_file")
    ky.set_defaults(func=cmd_keys)

    rj = sub.add_parser("reject-sim", help="play a reject actuator: fire time per alert, report late alerts")
    rj.add_argument("endpoint", help="the daemon's PUB endpoint")
    rj.add_argument("--speed", type=float, required=True, help="line speed, m/s")
    rj.add_argument("--distance", type=float, required=True, help="camera to actuator, m")
    rj.add_argument("--lead", type=float, default=0.02, help="actuator needs the command this early, s")
    rj.add_argument("--seconds", type=float, default=None, help="stop after this long")
    rj.set_defaults(func=cmd_reject_sim)

    cal = sub.add_parser("calibrate", help="measure the camera and the normal strip: flat-field, scale, thresholds")
    cal_sub = cal.add_subparsers(dest="step", required=True)
    ffp = cal_sub.add_parser("flatfield", help="per-column offset and gain from dark and white references")
    ffp.add_argument("--dark", type=Path, required=True, help="image file or folder, lens capped")
    ffp.add_argument("--white", type=Path, required=True, help="image file or folder, uniform target at ~half scale")
    ffp.add_argument("--out", type=Path, required=True, help="folder for flatfield.npz, .json and .png")
    ffp.add_argument("--max-noise", type=float, default=0.05, help="largest temporal noise / signal per column")
    ffp.set_defaults(func=cmd_calibrate_flatfield)

    sc = cal_sub.add_parser("scale", help="mm per pixel (target of known width) and mm per line")
    sc.add_argument("--target", type=Path, default=None, help="frame showing a bright target of known width")
    sc.add_argument("--target-width-mm", type=float, default=None)
    sc.add_argument("--mm-per-pulse", type=float, default=None, help="encoder: strip travel per pulse")
    sc.add_argument("--divider", type=int, default=None, help="encoder pulses per camera line")
    sc.add_argument("--line-rate", type=float, default=None, help="free-running camera: lines per second")
    sc.add_argument("--speed", type=float, default=None, help="free-running camera: line speed, m/min")
    sc.add_argument("--out", type=Path, required=True, help="folder for scale.json and scale.png")
    sc.set_defaults(func=cmd_calibrate_scale)

    th = cal_sub.add_parser("thresholds", help="per-band thresholds from normal strip for a false-alarm budget")
    with_config(th)
    th.add_argument("--bundle", type=Path, required=True, help="bundle to calibrate (its manifest is updated)")
    th.add_argument("--data", type=Path, default=None, help="folder of normal frames (default: synthetic strip)")
    th.add_argument("--frames", type=int, default=40, help="synthetic frames to run")
    th.add_argument("--first-line", type=int, default=3_000_000, help="synthetic strip line to start at")
    th.add_argument("--bands", type=int, default=4, help="CD bands")
    th.add_argument("--alarms-per-km", type=float, required=True, help="false-alarm budget")
    th.add_argument("--min-area-mm2", type=float, required=True, help="smallest defect")
    th.add_argument("--out", type=Path, required=True, help="folder for thresholds.json and thresholds.png")
    th.add_argument(
        "--labelled",
        type=Path,
        default=None,
        help="MVTec-layout folder: report FP rate, detection rate and best-F1 threshold (never needed)",
    )
    th.set_defaults(func=cmd_calibrate_thresholds)

    d = sub.add_parser("demo", help="synthetic strip end to end: export, fit, score frames with defects")
    with_config(d)
    d.add_argument("--out", type=Path, default=Path("demo_out"))
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except StripinspectError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
