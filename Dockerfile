# GPU image: CUDA + TensorRT base, both requirement files, `python run.py` as the entrypoint.
#   docker build -t groundlab . && docker run --gpus all -v $PWD/data:/data groundlab model=gdino action=train ...
FROM nvcr.io/nvidia/tensorrt:25.10-py3

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /workspace/groundlab
COPY . .
RUN python -m pip install --upgrade pip \
 && python -m pip install -c constraints.txt -r requirements.txt \
 && python -m pip install --no-deps -r requirements-nodeps.txt \
 && python -m pip install -c constraints.txt -r requirements-gpu.txt

ENTRYPOINT ["python", "run.py"]
