"""`/v1/embeddings`: each input's pooled final hidden states (`effllm.engine.embeddings`), as OpenAI returns
them: a list of floats, or with `encoding_format: base64` the little-endian float32 bytes in base64."""

from __future__ import annotations

import base64
import functools

from fastapi.responses import JSONResponse

from effllm.engine.embeddings import embed
from effllm.serve.completions import Served, check_prompt
from effllm.serve.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage


async def create_embeddings(served: Served, req: EmbeddingRequest) -> JSONResponse:
    prompts = []
    for item in req.inputs():
        ids = served.tokenizer.encode(item) if isinstance(item, str) else list(item)
        check_prompt(served, ids, None, "input")
        prompts.append(ids)
    model = served.engine.engine.model
    vectors = await served.engine.run(functools.partial(embed, model, prompts, req.pooling))
    data = []
    for i, vector in enumerate(vectors):
        if req.encoding_format == "base64":
            value = base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
        else:
            value = vector.tolist()
        data.append(Embedding(embedding=value, index=i))
    tokens = sum(len(p) for p in prompts)
    body = EmbeddingResponse(
        data=data, model=served.model_name, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    )
    return JSONResponse(body.model_dump())
