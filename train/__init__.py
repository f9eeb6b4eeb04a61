"""The training program: fine-tunes a torchvision classifier under the SageMaker training contract."""
