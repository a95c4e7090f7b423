"""What comes out of run folders: the runs table, evaluation on labelled data, ONNX export."""
