"""`influence demo`: a planted-fact corpus, a tiny model trained here, the whole job end to end."""
