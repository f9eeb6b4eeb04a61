# The program the sagemaker-training toolkit runs: SAGEMAKER_PROGRAM=train_job.py, placed in
# /opt/ml/code (the training image copies it there). It only hands over to the installed package,
# whose launcher runs the trainer here or, data-parallel, through torchrun.
from train.launcher import main

raise SystemExit(main())
