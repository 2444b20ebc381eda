"""Reports: the JSON document (``document``), its rendering for people (``render``, the only
module that imports rich) and plots (``plot``)."""
