# The program the sagemaker-training toolkit runs (SAGEMAKER_PROGRAM=train_job.py, with
# SAGEMAKER_SUBMIT_DIRECTORY pointing at this folder). It only hands over to the installed package.
from train.job import main

raise SystemExit(main())
