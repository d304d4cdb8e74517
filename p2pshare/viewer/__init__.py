"""The zero-footprint viewer's server side: decode received instances for the browser.

``decode`` owns every pydicom call of the viewer (headers, pixel data through the pylibjpeg
decoders, modality LUT, the compact wire format and thumbnails); ``study`` lists what of a
transfer is verified and in place so far, with a small cache so the page can poll it every
second.
"""
