"""Working with real PACS at both ends: library import helpers, Storage SCP, export, reconciliation.

``scp``        the node's DICOM Storage SCP (pynetdicom, in its own threads)
``dicomdir``   reading IHE PDI (CD/DVD) DICOMDIR indexes
``report``     a radiology report (PDF/text) as an Encapsulated PDF or Basic Text SR instance
``reconcile``  IHE Import Reconciliation: local identifiers in, originals kept in the objects
``export``     C-STORE SCU and STOW-RS senders
``exporting``  one export job: completeness against the signed manifest, reconcile, send, record
"""
