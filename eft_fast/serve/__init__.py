"""The OpenAI-compatible HTTP server (``eft-fast serve``; needs ``pip install 'eft_fast[serve]'``).

    from eft_fast.engine.async_engine import AsyncEFTEngine
    from eft_fast.serve.app import build_app      # an ASGI app for uvicorn or any ASGI server
"""
