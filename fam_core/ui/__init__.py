"""The browser viewer (``fam ui``): drop an image, see its classes or nearest neighbours with
their heatmaps. A page of its own served by the standard library's HTTP server
(:mod:`.app`), over the request pipeline run in-process or a ``fam.v1`` server
(:mod:`.backends`); :mod:`.views` turns the pipeline's answers into the page's JSON.
"""
