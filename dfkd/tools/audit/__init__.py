"""``dfkd audit RUN_DIR``: what a distilled student and a data-free run's synthetic samples reveal
of the teacher's training set. The one command besides teacher training that reads the
teacher's training split; it writes only into the run folder it names (``audit.json``,
``audit.md``, ``audit_pairs.png`` and TensorBoard panels under ``audit/``).

* **Memorization of synthetic samples**: each synthetic sample's distance to its nearest
  training image and to its nearest test image (the same number of each, drawn at random), in
  pixel space and in the teacher's penultimate-feature space. Test images are unseen by the
  teacher, so if synthesis does not copy training images the ratio d_train / d_test is about 1
  (its distribution is reported), and the fraction of samples whose nearest training image is
  closer than the nearest test image by more than ``margin`` (relative) is no larger than for
  unseen test images outside the references, measured the same way as the null. The ``k``
  closest synthetic/training pairs are drawn side by side to be looked at.
* **Membership inference** (loss threshold, Yeom et al. 2018): the per-sample loss of members
  (training images) against non-members (test images), for the teacher and the student: ROC AUC
  and the true-positive rate at 1% and 0.1% false positives. On the teacher it shows whether the
  attack sees anything at all; on the student, whether the student parrots the teacher's
  membership signal (Jagielski et al. 2023) though it never saw the data.
* **Offline LiRA** (Carlini et al. 2022): shadow models with the teacher's recipe, trained on
  random halves of test images held out from the references, give each evaluated sample the
  spread of its true-class logit among models that never saw it; the target's logit, standardized
  by it, is the score. Stronger than the loss threshold at low false-positive rates.
* **Online LiRA** (``--lira online``): shadow models trained on random halves of a pool of
  training and test images, each sample in exactly half of them, so that every evaluated sample
  has IN and OUT distributions; the likelihood ratio between them is the score. The strongest
  attack here, at the cost of training every shadow on as many images as the teacher saw.
* **Canaries** (``dfkd teacher ... data.canaries=N``): training images the teacher learned under
  a wrong label, recorded in its model file; the audit counts those each model still "knows".
"""
