"""Serving a trained model: the gallery index, exact search over it, and the Ray Serve app.

    index.py     embed a gallery split into an index folder (Ray Data over the shards)
    search.py    query embedding and exact blockwise inner-product top-k; the results page
    app.py       the Ray Serve application that follows a registry alias
    commands.py  `composeae index | search | serve`
"""
