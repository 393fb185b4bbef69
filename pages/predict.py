"""Predict: placeholder until the Predict issue lands (its owner replaces this file)."""

import streamlit as st

st.title("Predict")
st.info("Prediction arrives with the Predict issue.", icon=":material/construction:")
