"""The sweep's own page: a live summary of a Ray Tune search, rewritten while the search runs.

Three layers: the row model (`state`: plain data, tested without Ray), the renderers (`render`
and its pictures, `plots`: pure functions of rows), and the Tune callback that feeds the one and
writes the other (`callback`, the only module here that imports Ray).
"""
