"""An OpenAI-compatible server over one continuous-batching engine, with a web chat page at /.

    python -m nanoqwen.serve --ckpt qwen-7b-chat [--host 127.0.0.1] [--port 8000] [--api-key KEY]

It needs the `serve` extra (fastapi and uvicorn): pip install "nanoqwen[serve]". From Python,
`nanoqwen.serve.app.create_app(llm, model_name)` gives the ASGI app over an `LLM` already built.
"""
