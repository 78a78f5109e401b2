"""Serving the real page in-process for browser tests (used by conftest and test files)."""
from tests.factories import launch_local


def serve_app(model_dir, db, extra_model_dirs=None, precision="fp32", **build_kw):
    """(demo, engine): the real page on a free loopback port, its model loaded from a folder
    and warmed up as app.py does at start (the first study then pays no one-off import and
    kernel costs on the test's clock). `extra_model_dirs` given: studies are routed between the
    models as in the app, and one no model reads is refused; None (the other tests' synthetic
    pictures): the one model reads everything, under a warning when out of its domain.
    `precision`: the LM's inference form (the shipped model's tests pass the app's own,
    mrg_core.paths.SERVING_PRECISION: fp32 drafts took 20 s on an AVX2-only host, over the
    page waits). build_kw go to ui.build_app (auth, model_roots, admin_open); the caller
    closes both."""
    from mrg_core.engine import Engine, EngineSettings
    from ui import build_app, launch_kwargs

    engine = Engine.from_settings(EngineSettings(model_dir=model_dir,
                                                 database_url=f"sqlite:///{db}",
                                                 extra_model_dirs=tuple(extra_model_dirs or ()),
                                                 route=extra_model_dirs is not None,
                                                 precision=precision))
    engine.warm_up()
    demo = build_app(engine, **build_kw)
    try:
        launch_local(demo, auth=build_kw.get("auth"), **launch_kwargs(engine))
    except BaseException:
        engine.store.close()
        raise
    return demo, engine
