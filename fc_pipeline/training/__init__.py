"""Training: the loop (:mod:`.train`), the shard sample loader (:mod:`.samples`) and the
launch command of one or several machines (:mod:`.launch`)."""
