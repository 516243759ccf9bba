"""Wire formats: request bodies in, typed requests out; results in, reply bodies out.

``body`` decodes and checks any body at the edge (size, UTF-8, JSON, nesting,
lone surrogates); ``openai`` is the embeddings and models API, ``rerank`` the
Cohere (and Jina) rerank API, ``classify`` quantfn's classification API. Plain
values in and out: the API function and the GPU container share them.
"""
