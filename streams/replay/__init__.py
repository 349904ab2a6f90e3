"""``dealstream replay`` without its command line: the ordered republishing loop, its sources
(files, topic ranges), the batching sink, the resumable checkpoint and the progress line.
"""
